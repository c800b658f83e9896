"""The AWS IoT Device SDK v2 for Python, unmodified, keeping a device's shadow
in sync over mutual TLS, the way AWS IoT's shadow samples do.

Usage: shadow_mtls.py HOST PORT CA CERT KEY THING
Prints one line per step; exits 0 when every step happened, 1 otherwise.
"""

import json
import sys
import threading

from awscrt import mqtt
from awsiot import iotshadow, mqtt_connection_builder

TIMEOUT = 20


def main() -> int:
    host, port, ca, cert, key, thing = sys.argv[1:7]
    connection = mqtt_connection_builder.mtls_from_path(
        endpoint=host,
        port=int(port),
        cert_filepath=cert,
        pri_key_filepath=key,
        ca_filepath=ca,
        client_id=thing,
        clean_session=True,
        keep_alive_secs=30,
    )
    connection.connect().result(TIMEOUT)
    print("connected")
    shadow = iotshadow.IotShadowClient(connection)

    got = threading.Event()
    delta = threading.Event()
    accepted_versions = []
    seen_delta = {}

    def on_get_accepted(response):
        accepted_versions.append(response.version)
        got.set()

    def on_get_rejected(error):
        # A new thing has no shadow yet: AWS answers 404, and so must Umbra.
        print(f"get rejected {error.code}")
        got.set()

    def on_update_accepted(response):
        print(f"update accepted version {response.version}")

    def on_delta(response):
        seen_delta.update(response.state or {})
        delta.set()

    for future, _ in [
        shadow.subscribe_to_get_shadow_accepted(
            iotshadow.GetShadowSubscriptionRequest(thing_name=thing),
            mqtt.QoS.AT_LEAST_ONCE,
            on_get_accepted,
        ),
        shadow.subscribe_to_get_shadow_rejected(
            iotshadow.GetShadowSubscriptionRequest(thing_name=thing),
            mqtt.QoS.AT_LEAST_ONCE,
            on_get_rejected,
        ),
        shadow.subscribe_to_update_shadow_accepted(
            iotshadow.UpdateShadowSubscriptionRequest(thing_name=thing),
            mqtt.QoS.AT_LEAST_ONCE,
            on_update_accepted,
        ),
        shadow.subscribe_to_shadow_delta_updated_events(
            iotshadow.ShadowDeltaUpdatedSubscriptionRequest(thing_name=thing),
            mqtt.QoS.AT_LEAST_ONCE,
            on_delta,
        ),
    ]:
        future.result(TIMEOUT)
    print("subscribed")

    shadow.publish_get_shadow(
        iotshadow.GetShadowRequest(thing_name=thing, client_token="get-1"),
        mqtt.QoS.AT_LEAST_ONCE,
    ).result(TIMEOUT)
    if not got.wait(TIMEOUT):
        print("no answer to get")
        return 1

    # An operator's change, as the console would make it, reaches the device
    # as a delta...
    shadow.publish_update_shadow(
        iotshadow.UpdateShadowRequest(
            thing_name=thing,
            state=iotshadow.ShadowState(
                desired={"color": "green"}, reported={"color": "red"}
            ),
            client_token="update-1",
        ),
        mqtt.QoS.AT_LEAST_ONCE,
    ).result(TIMEOUT)
    if not delta.wait(TIMEOUT):
        print("no delta")
        return 1
    print(f"delta {json.dumps(seen_delta, sort_keys=True)}")

    # ...and the device reports it applied.
    shadow.publish_update_shadow(
        iotshadow.UpdateShadowRequest(
            thing_name=thing,
            state=iotshadow.ShadowState(reported={"color": "green"}),
            client_token="update-2",
        ),
        mqtt.QoS.AT_LEAST_ONCE,
    ).result(TIMEOUT)
    got.clear()
    shadow.publish_get_shadow(
        iotshadow.GetShadowRequest(thing_name=thing, client_token="get-2"),
        mqtt.QoS.AT_LEAST_ONCE,
    ).result(TIMEOUT)
    if not got.wait(TIMEOUT) or not accepted_versions:
        print("no shadow after the report")
        return 1
    print(f"in sync at version {accepted_versions[-1]}")
    connection.disconnect().result(TIMEOUT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
