"""Eclipse paho-mqtt (Python), MQTT 5, against a running Umbra: a shadow update
and a get with a response topic, correlation data and a user property; the
delta; and a QoS 2 message through the router, delivered at QoS 2.

Usage: paho_mqtt5.py HOST PORT. Prints "ok" and exits 0 when every step
behaved; raises otherwise.
"""

import json
import queue
import sys

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

HOST, PORT = sys.argv[1], int(sys.argv[2])
THING = "paho-lamp"
PREFIX = f"$aws/things/{THING}/shadow"
REPLIES = f"things/{THING}/replies"
WAIT = 10

messages = queue.Queue()
subscribed = queue.Queue()


def on_message(_client, _userdata, message):
    messages.put(message)


def on_subscribe(_client, _userdata, _mid, reason_codes, _properties):
    subscribed.put([code.value for code in reason_codes])


client = mqtt.Client(
    mqtt.CallbackAPIVersion.VERSION2, client_id=THING, protocol=mqtt.MQTTv5
)
client.on_message = on_message
client.on_subscribe = on_subscribe
client.connect(HOST, PORT, keepalive=30, clean_start=True)
client.loop_start()


def subscribe(topic, qos):
    client.subscribe(topic, qos=qos)
    codes = subscribed.get(timeout=WAIT)
    assert codes == [qos], f"{topic}: {codes}"


stash = []


def next_on(topic):
    """The next message on `topic`; others are kept for later calls (the
    reply on a response topic and the delta do not come in a set order)."""
    for message in stash:
        if message.topic == topic:
            stash.remove(message)
            return message
    while True:
        message = messages.get(timeout=WAIT)
        if message.topic == topic:
            return message
        stash.append(message)


subscribe(f"{PREFIX}/update/delta", 1)
subscribe(REPLIES, 1)
subscribe(f"things/{THING}/qos2", 2)

request = Properties(PacketTypes.PUBLISH)
request.ResponseTopic = REPLIES
request.CorrelationData = b"req-1"
request.UserProperty = [("trace", "t-1")]
update = {"state": {"desired": {"on": True}}, "clientToken": "tok-1"}
client.publish(f"{PREFIX}/update", json.dumps(update), qos=1, properties=request).wait_for_publish(WAIT)

reply = next_on(REPLIES)
body = json.loads(reply.payload)
assert body["version"] == 1 and body["clientToken"] == "tok-1", body
assert reply.properties.CorrelationData == b"req-1", reply.properties
assert ("trace", "t-1") in reply.properties.UserProperty, reply.properties
delta = json.loads(next_on(f"{PREFIX}/update/delta").payload)
assert delta["state"] == {"on": True}, delta

request.CorrelationData = b"req-2"
client.publish(f"{PREFIX}/get", "{}", qos=1, properties=request).wait_for_publish(WAIT)
reply = next_on(REPLIES)
assert json.loads(reply.payload)["state"]["delta"] == {"on": True}, reply.payload
assert reply.properties.CorrelationData == b"req-2", reply.properties

client.publish(f"things/{THING}/qos2", "exactly once", qos=2).wait_for_publish(WAIT)
message = next_on(f"things/{THING}/qos2")
assert message.qos == 2 and message.payload == b"exactly once", (message.qos, message.payload)

client.disconnect()
client.loop_stop()
print("ok")
