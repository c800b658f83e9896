// MQTT.js over WebSocket against a running Umbra, as MQTT 3.1.1 and as
// MQTT 5: a shadow update answered on /update/accepted, the delta, and (MQTT
// 5) a get whose reply comes to its response topic with its correlation
// data. Usage: node mqttjs_ws.js ws://HOST:PORT/mqtt. Prints "ok" per
// protocol version and exits 0, or exits 1 with the reason.
"use strict";
const mqtt = require("mqtt");

const url = process.argv[2];
const WAIT_MS = 10000;

function session(protocolVersion) {
  const thing = `mqttjs-v${protocolVersion}`;
  const prefix = `$aws/things/${thing}/shadow`;
  const replies = `things/${thing}/replies`;
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`v${protocolVersion}: timed out`)), WAIT_MS);
    const client = mqtt.connect(url, { clientId: thing, protocolVersion, clean: true, reconnectPeriod: 0 });
    const fail = (err) => { clearTimeout(timer); client.end(true); reject(err); };
    const seen = new Map();
    const check = () => {
      const accepted = seen.get(`${prefix}/update/accepted`);
      const delta = seen.get(`${prefix}/update/delta`);
      const reply = protocolVersion === 5 ? seen.get(replies) : true;
      if (!accepted || !delta || !reply) return;
      try {
        const body = JSON.parse(accepted.payload);
        if (body.version !== 1 || body.clientToken !== "js-1") throw new Error(`accepted: ${accepted.payload}`);
        if (JSON.stringify(JSON.parse(delta.payload).state) !== '{"on":true}') throw new Error(`delta: ${delta.payload}`);
        if (protocolVersion === 5) {
          const props = reply.packet.properties || {};
          if (String(props.correlationData) !== "js-corr") throw new Error(`correlation data: ${JSON.stringify(props)}`);
          if (JSON.parse(reply.payload).state.delta.on !== true) throw new Error(`reply: ${reply.payload}`);
        }
      } catch (err) { return fail(err); }
      clearTimeout(timer);
      // Done: a write racing the close (an acknowledgement) is no failure.
      client.removeListener("error", fail);
      client.on("error", () => {});
      client.end(false, {}, () => resolve());
    };
    client.on("error", fail);
    client.on("message", (topic, payload, packet) => { seen.set(topic, { payload: payload.toString(), packet }); check(); });
    client.on("connect", () => {
      const filters = [`${prefix}/update/accepted`, `${prefix}/update/delta`];
      if (protocolVersion === 5) filters.push(replies);
      client.subscribe(filters, { qos: 1 }, (err, granted) => {
        if (err) return fail(err);
        if (granted.some((g) => g.qos !== 1)) return fail(new Error(`granted ${JSON.stringify(granted)}`));
        const update = JSON.stringify({ state: { desired: { on: true } }, clientToken: "js-1" });
        client.publish(`${prefix}/update`, update, { qos: 1 }, (err) => {
          if (err) return fail(err);
          if (protocolVersion !== 5) return;
          const properties = { responseTopic: replies, correlationData: Buffer.from("js-corr") };
          client.publish(`${prefix}/get`, "{}", { qos: 1, properties }, (err) => err && fail(err));
        });
      });
    });
  });
}

(async () => {
  for (const version of [4, 5]) {
    await session(version);
    console.log(`ok v${version}`);
  }
})().catch((err) => { console.error(err.message || err); process.exit(1); });
