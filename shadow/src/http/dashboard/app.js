// Umbra's dashboard: the fleet at a glance, the live change feed, and one
// thing's shadows with an editor for desired state and a live telemetry
// chart. It uses the operator API like any client (with the token the
// operator gives it) and the broker's MQTT-over-WebSocket listener.
// Untrusted text (thing names, documents) only ever goes in as textContent.

const $ = (id) => document.getElementById(id);

const settings = {
  token: sessionStorage.getItem('umbra.token') ?? '',
  mqttUser: sessionStorage.getItem('umbra.mqttUser') ?? '',
  mqttPassword: sessionStorage.getItem('umbra.mqttPassword') ?? '',
};
let config = { tokens: false, mqttWebSocket: null, telemetryTopic: 'devices/{thing}/telemetry' };
// What the current view started (streams, timers, MQTT); stopped on leaving it.
let viewStops = [];

// ---------- API ----------

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function api(path, options = {}) {
  const headers = new Headers(options.headers ?? {});
  if (settings.token) headers.set('Authorization', `Bearer ${settings.token}`);
  const response = await fetch(path, { ...options, headers });
  if (response.ok) return response;
  let message = response.statusText;
  try {
    message = (await response.json()).message ?? message;
  } catch { /* not JSON */ }
  if (response.status === 401) {
    openSettings(settings.token ? 'The token was not accepted.' : 'This API needs a token.');
  } else if (response.status === 403) {
    message = 'this token may not do that (changing state needs a write token)';
  }
  throw new ApiError(response.status, message);
}

async function getJson(path) {
  return (await api(path)).json();
}

function enc(value) {
  return encodeURIComponent(value);
}

// Follows a change stream (SSE over fetch, so that it can send the token),
// resuming after the last event it saw whenever the connection drops.
function follow(path, onChange, onState) {
  const controller = new AbortController();
  let lastId = null;
  let stopped = false;
  (async () => {
    let delay = 500;
    while (!stopped) {
      try {
        const headers = lastId === null ? {} : { 'Last-Event-ID': lastId };
        const response = await api(path, { headers, signal: controller.signal });
        onState('live');
        delay = 500;
        const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
        let buffer = '';
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buffer += value.replaceAll('\r\n', '\n');
          let end;
          while ((end = buffer.indexOf('\n\n')) >= 0) {
            const event = parseEvent(buffer.slice(0, end));
            buffer = buffer.slice(end + 2);
            if (!event) continue;
            if (event.event === 'end') {
              // Lagged: the server ends the stream; resume after its last event.
              const data = JSON.parse(event.data);
              if (data.lastEventId != null) lastId = String(data.lastEventId);
              continue;
            }
            if (event.id !== undefined) lastId = event.id;
            onChange(JSON.parse(event.data));
          }
        }
        if (!stopped) onState('reconnecting');
      } catch (error) {
        if (stopped) return;
        if (error.status === 401 || error.status === 403) {
          onState(error.message);
          return;
        }
        // Pruned past the retention window: start again from now.
        if (error.status === 410) lastId = null;
        onState(`reconnecting (${error.message})`);
      }
      await new Promise((resolve) => setTimeout(resolve, delay));
      delay = Math.min(delay * 2, 10_000);
    }
  })();
  return () => {
    stopped = true;
    controller.abort();
  };
}

function parseEvent(block) {
  const event = { data: '' };
  let data = [];
  for (const line of block.split('\n')) {
    if (line === '' || line.startsWith(':')) continue;
    const colon = line.indexOf(':');
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? '' : line.slice(colon + 1);
    if (value.startsWith(' ')) value = value.slice(1);
    if (field === 'data') data.push(value);
    else if (field === 'id') event.id = value;
    else if (field === 'event') event.event = value;
  }
  if (data.length === 0) return null;
  event.data = data.join('\n');
  return event;
}

// ---------- Prometheus text ----------

function parseMetrics(text) {
  const samples = [];
  for (const line of text.split('\n')) {
    if (line === '' || line.startsWith('#')) continue;
    const match = line.match(/^([A-Za-z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)/);
    if (!match) continue;
    const labels = {};
    for (const [, key, value] of (match[2] ?? '').matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) {
      labels[key] = value;
    }
    samples.push({ name: match[1], labels, value: Number(match[3]) });
  }
  return samples;
}

// The q-quantile of what a histogram observed between two scrapes, by
// linear interpolation inside the bucket it falls in.
function quantile(q, before, after) {
  const buckets = after
    .map(({ le, count }) => ({ le, count: count - (before.find((b) => b.le === le)?.count ?? 0) }))
    .sort((a, b) => a.le - b.le);
  const total = buckets.at(-1)?.count ?? 0;
  if (total <= 0) return null;
  const rank = q * total;
  let lower = 0;
  let below = 0;
  for (const { le, count } of buckets) {
    if (count >= rank) {
      if (!Number.isFinite(le)) return lower;
      return lower + ((le - lower) * (rank - below)) / Math.max(count - below, 1e-9);
    }
    lower = le;
    below = count;
  }
  return lower;
}

// ---------- formatting ----------

function text(element, value) {
  element.textContent = value;
  return element;
}

function cell(row, value, className) {
  const td = row.insertCell();
  if (value instanceof Node) td.append(value);
  else td.textContent = value ?? '';
  if (className) td.className = className;
  return td;
}

function thingLink(thing, shadow) {
  const a = document.createElement('a');
  a.href = `#/thing/${enc(thing)}${shadow ? `/${enc(shadow)}` : ''}`;
  a.textContent = thing;
  a.dataset.thing = thing;
  return a;
}

function number(n) {
  return n == null ? '–' : n.toLocaleString('en-US');
}

function millis(seconds) {
  const ms = seconds * 1e3;
  return ms < 10 ? ms.toFixed(1) : ms.toFixed(0);
}

function clock(epochSeconds) {
  if (!epochSeconds) return '–';
  return new Date(epochSeconds * 1000).toLocaleTimeString('en-GB');
}

function setStatus(message) {
  text($('status'), message);
}

// ---------- settings ----------

function openSettings(reason) {
  const dialog = $('settings');
  text($('settings-reason'), reason ?? '');
  $('token').value = settings.token;
  $('mqtt-user').value = settings.mqttUser;
  $('mqtt-password').value = settings.mqttPassword;
  if (!dialog.open) dialog.showModal();
}

function saveSettings() {
  settings.token = $('token').value.trim();
  settings.mqttUser = $('mqtt-user').value.trim();
  settings.mqttPassword = $('mqtt-password').value;
  sessionStorage.setItem('umbra.token', settings.token);
  sessionStorage.setItem('umbra.mqttUser', settings.mqttUser);
  sessionStorage.setItem('umbra.mqttPassword', settings.mqttPassword);
  $('settings').close();
  route();
}

// ---------- the fleet overview ----------

function showOverview() {
  $('overview').hidden = false;
  let previous = null;
  const refresh = async () => {
    try {
      const fleet = await getJson('/v1/fleet');
      text($('things'), number(fleet.things));
      text($('connected'), number(fleet.connected));
      text($('in-sync'), number(fleet.shadowsInSync));
      text($('with-delta'), number(fleet.shadowsWithDelta));
      const scrape = { at: performance.now(), ...updates(parseMetrics(await (await api('/metrics')).text())) };
      if (previous) {
        const seconds = (scrape.at - previous.at) / 1000;
        text($('update-rate'), ((scrape.count - previous.count) / seconds).toFixed(1));
        const p50 = quantile(0.5, previous.buckets, scrape.buckets);
        const p99 = quantile(0.99, previous.buckets, scrape.buckets);
        text($('latency'), p50 == null ? 'idle' : `${millis(p50)} / ${millis(p99)} ms`);
      }
      previous = scrape;
      setStatus(`updated ${new Date().toLocaleTimeString('en-GB')}`);
    } catch (error) {
      setStatus(`fleet: ${error.message}`);
    }
  };
  refresh();
  const timer = setInterval(refresh, 2000);
  viewStops.push(() => clearInterval(timer));

  listThings($('search-q').value.trim());
  startFeed($('feed-q').value.trim());
}

// Shadow updates answered and their latency histogram, from /metrics.
function updates(samples) {
  const count = samples
    .filter((s) => s.name === 'umbra_shadow_requests_total' && s.labels.operation === 'update')
    .reduce((sum, s) => sum + s.value, 0);
  const buckets = samples
    .filter((s) => s.name === 'umbra_shadow_request_seconds_bucket' && s.labels.operation === 'update')
    .map((s) => ({ le: s.labels.le === '+Inf' ? Infinity : Number(s.labels.le), count: s.value }));
  return { count, buckets };
}

let thingsNext = null;
let thingsQuery = '';

async function listThings(query, more = false) {
  const list = $('things-list');
  const error = $('search-error');
  if (!more) {
    thingsQuery = query;
    thingsNext = null;
  }
  const page = thingsNext ? `&nextToken=${enc(thingsNext)}` : '';
  const path = thingsQuery
    ? `/v1/search?q=${enc(thingsQuery)}&pageSize=25${page}`
    : `/v1/things?pageSize=25${page}`;
  try {
    const answer = await getJson(path);
    error.hidden = true;
    if (!more) list.replaceChildren();
    for (const thing of answer.things) {
      const row = list.insertRow();
      cell(row, thingLink(thing.thingName));
      const dot = document.createElement('span');
      dot.className = thing.connectivity?.connected ? 'dot on' : 'dot';
      cell(row, dot);
      cell(row, shadowNames(thing).join(', '));
    }
    thingsNext = answer.nextToken ?? null;
    $('things-more').hidden = !thingsNext;
  } catch (e) {
    text(error, e.message);
    error.hidden = false;
  }
}

// A listed thing has `shadows`, a searched one `shadow` (with `name`).
function shadowNames(thing) {
  if (thing.shadows) return thing.shadows.map((s) => `${s.name ?? 'classic'} v${s.version}`);
  const names = [];
  if (thing.shadow?.version != null) names.push(`classic v${thing.shadow.version}${thing.shadow.hasDelta ? ' (delta)' : ''}`);
  for (const [name, s] of Object.entries(thing.shadow?.name ?? {})) {
    names.push(`${name} v${s.version}${s.hasDelta ? ' (delta)' : ''}`);
  }
  return names;
}

let stopFeed = null;

function startFeed(query) {
  stopFeed?.();
  const feed = $('feed');
  feed.replaceChildren();
  const path = query ? `/v1/changes?q=${enc(query)}` : '/v1/changes';
  stopFeed = follow(
    path,
    (change) => {
      const row = feed.insertRow(0);
      cell(row, change.seq);
      cell(row, clock(change.time));
      cell(row, change.kind);
      cell(row, thingLink(change.thing, change.name));
      cell(row, change.name ?? '');
      cell(row, change.version || '');
      while (feed.rows.length > 100) feed.deleteRow(-1);
    },
    (state) => text($('feed-state'), state),
  );
  viewStops.push(() => stopFeed?.());
}

// ---------- one thing ----------

function showThing(thing, shadow) {
  $('thing').hidden = false;
  text($('thing-name'), thing);
  const editor = $('desired-editor');
  editor.value = '';
  editor.dataset.dirty = '';
  text($('desired-status'), '');
  let current = null;
  let waitingFor = null;

  const shadowParam = shadow ? `?name=${enc(shadow)}` : '';
  const load = async () => {
    const error = $('shadow-error');
    try {
      current = await getJson(`/things/${enc(thing)}/shadow${shadowParam}`);
      error.hidden = true;
    } catch (e) {
      current = null;
      text(error, e.status === 404 ? 'No shadow yet: update desired below to create it.' : e.message);
      error.hidden = false;
    }
    renderShadow(current);
    setStatus(`updated ${new Date().toLocaleTimeString('en-GB')}`);
    if (!editor.dataset.dirty) editor.value = JSON.stringify(current?.state?.desired ?? {}, null, 2);
    if (waitingFor !== null && current && current.version >= waitingFor && !current.state?.delta) {
      text($('desired-status'), `the device reported it (version ${current.version})`);
      waitingFor = null;
    }
    loadChanges(thing, shadow, current?.version ?? 0);
  };
  editor.oninput = () => {
    editor.dataset.dirty = 'yes';
  };
  $('desired-save').onclick = async () => {
    let desired;
    try {
      desired = JSON.parse(editor.value);
    } catch (e) {
      text($('desired-status'), `not JSON: ${e.message}`);
      return;
    }
    if (desired === null || typeof desired !== 'object' || Array.isArray(desired)) {
      text($('desired-status'), 'desired state is a JSON object');
      return;
    }
    try {
      const response = await api(`/things/${enc(thing)}/shadow${shadowParam}`, {
        method: 'POST',
        headers: { 'Content-Type': 'application/json' },
        body: JSON.stringify({ state: { desired } }),
      });
      const accepted = await response.json();
      editor.dataset.dirty = '';
      waitingFor = accepted.version;
      text($('desired-status'), `accepted as version ${accepted.version}; waiting for the device…`);
      load();
    } catch (e) {
      text($('desired-status'), `refused: ${e.message}`);
    }
  };

  renderTabs(thing, shadow);
  loadConnectivity(thing);
  load();
  const stop = follow(
    `/v1/changes?thing=${enc(thing)}`,
    (change) => {
      if (change.kind === 'connect' || change.kind === 'disconnect') {
        renderConnectivity(change.kind === 'connect', change.time);
      } else if ((change.name ?? null) === (shadow ?? null)) {
        load();
      } else {
        renderTabs(thing, shadow);
      }
    },
    (state) => text($('thing-live'), state === 'live' ? 'live' : state),
  );
  viewStops.push(stop);
  viewStops.push(startTelemetry(thing));
}

async function renderTabs(thing, shadow) {
  const tabs = $('shadow-tabs');
  let names = [];
  try {
    names = (await getJson(`/api/things/shadow/ListNamedShadowsForThing/${enc(thing)}?pageSize=100`)).results;
  } catch { /* shown by the shadow itself */ }
  tabs.replaceChildren();
  for (const name of [null, ...names]) {
    const a = document.createElement('a');
    a.href = `#/thing/${enc(thing)}${name ? `/${enc(name)}` : ''}`;
    a.textContent = name ?? 'classic';
    if ((name ?? null) === (shadow ?? null)) a.className = 'current';
    tabs.append(a);
  }
}

async function loadConnectivity(thing) {
  try {
    const answer = await getJson(`/v1/search?q=${enc(`thingName:${thing}`)}&pageSize=1`);
    const found = answer.things.find((t) => t.thingName === thing);
    const c = found?.connectivity;
    if (c) renderConnectivity(c.connected, c.timestamp / 1000);
    else text($('thing-connectivity'), 'never connected').className = 'badge off';
  } catch {
    text($('thing-connectivity'), 'connectivity unknown').className = 'badge off';
  }
}

function renderConnectivity(connected, epochSeconds) {
  const badge = $('thing-connectivity');
  text(badge, `${connected ? 'connected' : 'disconnected'} since ${clock(epochSeconds)}`);
  badge.className = connected ? 'badge ok' : 'badge off';
}

function renderShadow(doc) {
  text($('shadow-version'), doc?.version ?? '–');
  // A document's own timestamp is when it was read; its last change is
  // the latest metadata timestamp.
  text($('shadow-time'), clock(latest(doc?.metadata)));
  const delta = doc?.state?.delta;
  const sync = $('sync-state');
  if (!doc) {
    text(sync, 'no shadow').className = 'badge off';
  } else if (delta && Object.keys(delta).length > 0) {
    text(sync, `delta: ${Object.keys(delta).join(', ')}`).className = 'badge warn';
  } else {
    text(sync, 'in sync').className = 'badge ok';
  }
  renderState($('desired'), doc?.state?.desired, doc?.metadata?.desired);
  renderState($('reported'), doc?.state?.reported, doc?.metadata?.reported);
  // A delta key's time is when it was desired.
  renderState($('delta'), delta, doc?.metadata?.desired);
}

function latest(metadata) {
  if (metadata === null || typeof metadata !== 'object') return 0;
  if (typeof metadata.timestamp === 'number') return metadata.timestamp;
  return Math.max(0, ...Object.values(metadata).map(latest));
}

// One row per leaf: its path, its value and when it was last set.
function renderState(body, state, metadata) {
  body.replaceChildren();
  const rows = [];
  const walk = (value, meta, path) => {
    if (value !== null && typeof value === 'object' && !Array.isArray(value)) {
      for (const [key, child] of Object.entries(value)) walk(child, meta?.[key], path ? `${path}.${key}` : key);
    } else {
      rows.push([path, value, meta?.timestamp]);
    }
  };
  walk(state ?? {}, metadata, '');
  for (const [path, value, timestamp] of rows) {
    const row = body.insertRow();
    row.dataset.path = path;
    cell(row, path);
    cell(row, JSON.stringify(value), 'value');
    cell(row, clock(timestamp), 'time');
  }
  if (rows.length === 0) {
    cell(body.insertRow(), 'empty', 'time');
  }
}

async function loadChanges(thing, shadow, version) {
  const since = Math.max(0, version - 10);
  const name = shadow ? `&name=${enc(shadow)}` : '';
  const body = $('thing-changes');
  try {
    const answer = await getJson(`/v1/things/${enc(thing)}/shadow/changes?since_version=${since}${name}`);
    body.replaceChildren();
    for (const change of answer.changes.slice().reverse()) {
      const row = body.insertRow();
      cell(row, change.version);
      cell(row, clock(change.time));
      cell(row, change.kind);
      cell(row, JSON.stringify(change.document?.state?.desired ?? null));
      cell(row, JSON.stringify(change.document?.state?.reported ?? null));
    }
  } catch (e) {
    body.replaceChildren();
    cell(body.insertRow(), e.message, 'error');
  }
}

// ---------- telemetry over MQTT over WebSocket ----------

// A subscriber of MQTT 3.1.1 at QoS 0, which is all the chart needs:
// CONNECT, SUBSCRIBE, PUBLISH in, PINGREQ; the socket is the WebSocket
// subprotocol "mqtt" of the broker.
function mqttSubscribe(url, topic, credentials, onMessage, onState) {
  const encoder = new TextEncoder();
  const str = (s) => {
    const bytes = encoder.encode(s);
    return [bytes.length >> 8, bytes.length & 255, ...bytes];
  };
  const packet = (first, body) => {
    const length = [];
    let n = body.length;
    do {
      let byte = n % 128;
      n = Math.floor(n / 128);
      if (n > 0) byte |= 128;
      length.push(byte);
    } while (n > 0);
    return new Uint8Array([first, ...length, ...body]);
  };
  const keepAlive = 30;
  let flags = 0x02; // clean session
  const payload = [...str(`umbra-dashboard-${Math.random().toString(36).slice(2, 10)}`)];
  if (credentials.user) {
    flags |= 0x80;
    payload.push(...str(credentials.user));
    if (credentials.password) {
      flags |= 0x40;
      payload.push(...str(credentials.password));
    }
  }
  let socket = null;
  let buffer = new Uint8Array(0);
  let ping = null;
  let stopped = false;
  let refused = false;
  // A dropped connection is made again after 2 s; a refusal is final.
  const connect = () => {
    socket = new WebSocket(url, 'mqtt');
    socket.binaryType = 'arraybuffer';
    buffer = new Uint8Array(0);
    socket.onopen = () => {
      socket.send(packet(0x10, [...str('MQTT'), 4, flags, 0, keepAlive, ...payload]));
    };
    socket.onmessage = receive;
    socket.onerror = () => onState(`cannot reach ${url}`);
    socket.onclose = () => {
      clearInterval(ping);
      if (stopped || refused) return;
      onState('disconnected, reconnecting');
      setTimeout(() => stopped || connect(), 2000);
    };
  };
  const receive = (message) => {
    const incoming = new Uint8Array(message.data);
    const joined = new Uint8Array(buffer.length + incoming.length);
    joined.set(buffer);
    joined.set(incoming, buffer.length);
    buffer = joined;
    for (;;) {
      // Fixed header: type and flags, then the remaining length (1-4 bytes).
      let length = 0;
      let multiplier = 1;
      let at = 1;
      let complete = false;
      while (at < buffer.length && at <= 4) {
        const byte = buffer[at++];
        length += (byte & 127) * multiplier;
        multiplier *= 128;
        if ((byte & 128) === 0) {
          complete = true;
          break;
        }
      }
      if (!complete || buffer.length < at + length) return;
      handle(buffer[0], buffer.subarray(at, at + length));
      buffer = buffer.slice(at + length);
    }
  };
  const handle = (first, body) => {
    switch (first >> 4) {
      case 2: // CONNACK
        if (body[1] !== 0) {
          const reasons = { 4: 'bad user name or password', 5: 'not authorized' };
          onState(`refused by the broker: ${reasons[body[1]] ?? `code ${body[1]}`}`);
          refused = true;
          socket.close();
          return;
        }
        socket.send(packet(0x82, [0, 1, ...str(topic), 0]));
        ping = setInterval(() => socket.send(packet(0xc0, [])), (keepAlive * 1000) / 2);
        break;
      case 9: // SUBACK
        onState(body[2] === 0x80 ? `subscription to ${topic} refused` : `subscribed to ${topic}`);
        break;
      case 3: { // PUBLISH (QoS 0: no packet id)
        const topicLength = (body[0] << 8) | body[1];
        const qos = (first >> 1) & 3;
        const start = 2 + topicLength + (qos > 0 ? 2 : 0);
        onMessage(new TextDecoder().decode(body.subarray(start)));
        break;
      }
      default:
        break;
    }
  };
  connect();
  return () => {
    stopped = true;
    clearInterval(ping);
    if (socket.readyState === WebSocket.OPEN) socket.send(packet(0xe0, []));
    socket.close();
  };
}

const COLORS = ['#2563eb', '#dc2626', '#16a34a', '#9333ea', '#ea580c', '#0891b2'];

function startTelemetry(thing) {
  const state = $('telemetry-state');
  const canvas = $('telemetry-chart');
  state.dataset.count = '0';
  $('telemetry-legend').replaceChildren();
  canvas.getContext('2d').clearRect(0, 0, canvas.width, canvas.height);
  const ws = config.mqttWebSocket;
  if (!ws) {
    text(state, 'no MQTT WebSocket listener');
    return () => {};
  }
  const topic = config.telemetryTopic.replaceAll('{thing}', thing);
  const url = `${ws.tls ? 'wss' : 'ws'}://${location.hostname}:${ws.port}/mqtt`;
  const series = new Map();
  let count = 0;
  let status = 'connecting';
  const show = () => text(state, `${status}${count ? `, ${count} messages` : ''}`);
  show();
  return mqttSubscribe(
    url,
    topic,
    { user: settings.mqttUser, password: settings.mqttPassword },
    (payload) => {
      let sample;
      try {
        sample = JSON.parse(payload);
      } catch {
        sample = { value: Number(payload) };
      }
      const now = Date.now();
      for (const [key, value] of Object.entries(sample ?? {})) {
        if (typeof value !== 'number' || !Number.isFinite(value) || key === 'seq') continue;
        if (!series.has(key)) series.set(key, []);
        const points = series.get(key);
        points.push([now, value]);
        if (points.length > 300) points.shift();
      }
      count += 1;
      state.dataset.count = String(count);
      show();
      drawChart(canvas, series);
    },
    (s) => {
      status = s;
      show();
    },
  );
}

// Each series on its own scale (their units differ), over the time seen.
function drawChart(canvas, series) {
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth;
  const height = canvas.clientHeight;
  canvas.width = width * ratio;
  canvas.height = height * ratio;
  const g = canvas.getContext('2d');
  g.scale(ratio, ratio);
  g.clearRect(0, 0, width, height);
  const all = [...series.values()].flat();
  if (all.length === 0) return;
  const t0 = Math.min(...all.map((p) => p[0]));
  const t1 = Math.max(t0 + 1000, ...all.map((p) => p[0]));
  const pad = { left: 8, right: 8, top: 8, bottom: 18 };
  g.strokeStyle = '#e3e6eb';
  g.fillStyle = '#6b7280';
  g.font = '11px system-ui, sans-serif';
  g.beginPath();
  g.moveTo(pad.left, height - pad.bottom + 0.5);
  g.lineTo(width - pad.right, height - pad.bottom + 0.5);
  g.stroke();
  g.fillText(new Date(t0).toLocaleTimeString('en-GB'), pad.left, height - 4);
  const last = new Date(t1).toLocaleTimeString('en-GB');
  g.fillText(last, width - pad.right - g.measureText(last).width, height - 4);
  const legend = $('telemetry-legend');
  legend.replaceChildren();
  let index = 0;
  for (const [key, points] of series) {
    const color = COLORS[index++ % COLORS.length];
    const values = points.map((p) => p[1]);
    let lo = Math.min(...values);
    let hi = Math.max(...values);
    if (hi - lo < 1e-9) {
      lo -= 1;
      hi += 1;
    }
    const x = (t) => pad.left + ((t - t0) / (t1 - t0)) * (width - pad.left - pad.right);
    const y = (v) => pad.top + (1 - (v - lo) / (hi - lo)) * (height - pad.top - pad.bottom);
    g.strokeStyle = color;
    g.lineWidth = 1.5;
    g.beginPath();
    points.forEach(([t, v], i) => (i === 0 ? g.moveTo(x(t), y(v)) : g.lineTo(x(t), y(v))));
    g.stroke();
    const label = document.createElement('span');
    label.style.setProperty('--swatch', color);
    label.textContent = `${key} ${values.at(-1)} (${lo.toPrecision(4)}–${hi.toPrecision(4)})`;
    legend.append(label);
  }
}

// ---------- routing ----------

function route() {
  for (const stop of viewStops) stop();
  viewStops = [];
  $('overview').hidden = true;
  $('thing').hidden = true;
  const [, view, thing, shadow] = location.hash.split('/');
  if (view === 'thing' && thing) {
    showThing(decodeURIComponent(thing), shadow ? decodeURIComponent(shadow) : null);
  } else {
    showOverview();
  }
}

async function start() {
  $('settings-open').onclick = () => openSettings();
  $('settings-cancel').onclick = () => $('settings').close();
  $('settings-save').onclick = saveSettings;
  $('search-form').onsubmit = (event) => {
    event.preventDefault();
    listThings($('search-q').value.trim());
  };
  $('things-more').onclick = () => listThings(thingsQuery, true);
  $('feed-form').onsubmit = (event) => {
    event.preventDefault();
    startFeed($('feed-q').value.trim());
  };
  try {
    config = await (await fetch('/ui/config.json')).json();
  } catch (e) {
    setStatus(`cannot read /ui/config.json: ${e.message}`);
  }
  window.addEventListener('hashchange', route);
  if (config.tokens && !settings.token) openSettings('This API needs a token.');
  route();
}

start();
