// The page: a live voice chat with the server, and live captions. It keeps the conversation's history and
// sends it whole each turn, as OpenAI's chat API expects; the server recognises the turns it has seen.

import {
  ANSWER_RATE, MIC_RATE, Mic, Pcm16Decoder, Player, Resampler, Vad, base64ToBytes, bytesToBase64, concat, encodeWav,
} from './audio.js';
import { MODEL, health, setApiKey, streamChat, transcribe } from './api.js';
import { FORMATS, download } from './captions.js';

const $ = (id) => document.getElementById(id);
const ui = {
  start: $('start'), ptt: $('ptt'), stop: $('stop'), reset: $('reset'), log: $('log'), status: $('status'),
  form: $('chat-form'), text: $('text'), error: $('error'), events: $('events'), vadState: $('vad-state'),
  pause: $('pause'), pauseValue: $('pause-value'), threshold: $('threshold'), thresholdValue: $('threshold-value'),
  level: $('level'), levelText: $('level-text'), bargein: $('bargein'), speak: $('speak'), voice: $('voice'),
  captions: $('captions'), chatPanel: $('chat-panel'), captionsPanel: $('captions-panel'),
  serverState: $('server-state'), keyRow: $('key-row'), apiKey: $('api-key'),
};

const state = {
  history: [], // the messages as sent: user turns, and answers cited by their audio id
  lastRequestBody: null,
  answer: null, // the answer being received, or null
  mode: 'chat', // or 'captions'
  handsFree: false, // listening with voice activity detection
  ptt: null, // a push-to-talk recording in progress: {frames, start}
  pttHeld: false, // the push-to-talk button is held down right now
  micOpening: null, // the promise of the microphone being opened
  vad: null, // voice activity detection, on the 16 kHz sound
  resampler: null, // the microphone's rate -> 16 kHz, as it arrives
  captions: [], // {start, end, text, status: 'pending' | 'done' | 'failed', error, wav (base64)}
  captionOrigin: null, // the detector's clock (s) when the captions began
  frames: 0,
  serverUp: null,
  lastDownload: null,
};
const mic = new Mic();
const player = new Player();

// For tests and assistive tools: the history exactly as sent, and the latest chat request's JSON body.
window.lfm2 = {
  get history() { return state.history; },
  get lastRequestBody() { return state.lastRequestBody; },
  get captions() { return state.captions; },
  get busy() { return state.answer !== null; },
  get playing() { return player.playing; },
  get lastDownload() { return state.lastDownload; },
  get vad() { return state.vad; },
  player,
};

// ---- messages to the user ----

function note(text, isError = false) {
  const li = document.createElement('li');
  li.textContent = `${new Date().toLocaleTimeString()} ${text}`;
  if (isError) li.className = 'error';
  ui.events.prepend(li);
  while (ui.events.children.length > 100) ui.events.lastChild.remove();
}

function showError(text) {
  ui.error.textContent = text;
  note(text, true);
}

function clearError() {
  ui.error.textContent = '';
}

const setStatus = (text) => { ui.status.textContent = text; };
const setVadState = (text) => { ui.vadState.textContent = text; };

function addEntry(role, text) {
  const el = document.createElement('div');
  el.className = role;
  el.textContent = text;
  ui.log.append(el);
  ui.log.scrollTop = ui.log.scrollHeight;
  return el;
}

// ---- the server's state ----

const HEALTH_FIELDS = {
  'h-model': (h) => h.model,
  'h-device': (h) => h.device,
  'h-dtype': (h) => h.dtype,
  'h-quantize': (h) => h.quantize ?? 'none',
  'h-vocoder': (h) => h.vocoder,
  'h-rows': (h) => `${h.rows_busy} / ${h.rows}`,
  'h-waiting': (h) => h.waiting,
};

async function pollHealth() {
  try {
    const h = await health();
    for (const [id, value] of Object.entries(HEALTH_FIELDS)) $(id).textContent = value(h) ?? '–';
    ui.serverState.textContent = h.status || 'ready';
    if (h.auth) ui.keyRow.hidden = false;
    ui.serverState.classList.remove('down');
    if (state.serverUp === false) note('server up again');
    state.serverUp = true;
  } catch (e) {
    ui.serverState.textContent = 'server down';
    ui.serverState.classList.add('down');
    if (state.serverUp !== false) note(`server down (${e.message})`, true);
    state.serverUp = false;
  } finally {
    setTimeout(pollHealth, 3000);
  }
}

// ---- the microphone and voice activity ----

function vadSettings() {
  return { pause: Number(ui.pause.value), margin: Number(ui.threshold.value) };
}

// Opens the microphone once, however many buttons ask for it while it opens.
function ensureMic() {
  if (mic.running) return Promise.resolve(true);
  if (!state.micOpening) state.micOpening = openMic().finally(() => { state.micOpening = null; });
  return state.micOpening;
}

async function openMic() {
  setVadState('opening the microphone…');
  try {
    await mic.start(onFrame);
  } catch (e) {
    mic.stop();
    setVadState('Microphone off.');
    showError(e.message);
    return false;
  }
  state.resampler = new Resampler(mic.rate, MIC_RATE);
  if (!state.vad) state.vad = new Vad(MIC_RATE, vadSettings());
  state.vad.reset();
  mic.onEnded = () => {
    showError('the microphone stopped (unplugged, or its permission withdrawn)');
    stopListening();
  };
  return true;
}

async function startListening() {
  player.ensure(); // this click is the user gesture that lets the page play sound later
  if (!(await ensureMic())) return;
  state.handsFree = true;
  ui.start.textContent = 'Stop listening'; // the label says what a press does next
  if (state.mode === 'captions') beginCaptions();
  setVadState('listening…');
  note(`listening (microphone at ${mic.rate} Hz)`);
}

function stopListening() {
  state.handsFree = false;
  if (!state.ptt) mic.stop();
  if (state.vad) state.vad.reset();
  ui.start.textContent = 'Start listening';
  setVadState('Microphone off.');
}

// Every 20 ms of microphone sound, at the microphone's rate.
function onFrame(input) {
  const frame = state.resampler.push(input);
  if (frame.length === 0) return;
  const vad = state.vad;
  const event = vad.push(frame);
  if (++state.frames % 5 === 0) showLevel(vad);
  if (state.ptt) {
    state.ptt.frames.push(frame);
    return; // push to talk decides the turn, not the detector
  }
  if (!state.handsFree || !event) return;
  if (event.type === 'start') onSpeechStart();
  else if (event.type === 'end') onSpeechEnd(event);
  else if (event.type === 'discard') setVadState('listening… (a short noise, ignored)');
}

function showLevel(vad) {
  ui.level.value = Math.max(-90, vad.level);
  const noise = vad.floor === null ? 'not heard yet' : `${vad.floor.toFixed(0)} dB`;
  ui.levelText.textContent = `${vad.level.toFixed(0)} dB; noise ${noise}; speech above ${vad.threshold.toFixed(0)} dB`;
}

function onSpeechStart() {
  setVadState('hearing speech…');
  if (state.mode === 'chat' && ui.bargein.checked && (state.answer || player.playing)) {
    interrupt('you started speaking');
  }
}

function onSpeechEnd(event) {
  setVadState(event.cut ? 'still hearing speech… (long turn cut here)' : 'listening…');
  if (state.mode === 'chat') sendSpoken(event.samples);
  else addCaption(event.samples, event.start, event.end);
}

// ---- push to talk: hold the button (pointer), or press it once to start and once to send (keyboard) ----

async function pttStart(byKeyboard) {
  player.ensure();
  if (state.ptt) return;
  if (!(await ensureMic())) return;
  if (!byKeyboard && !state.pttHeld) { // released while the microphone was opening
    if (!state.handsFree) mic.stop();
    return;
  }
  if (state.mode === 'chat' && (state.answer || player.playing)) interrupt('push to talk');
  state.vad.reset();
  state.ptt = { frames: [], start: state.vad.samples / state.vad.rate };
  ui.ptt.setAttribute('aria-pressed', 'true');
  setVadState('recording (push to talk)…');
}

function pttEnd() {
  const ptt = state.ptt;
  if (!ptt) return;
  state.ptt = null;
  ui.ptt.setAttribute('aria-pressed', 'false');
  const rate = MIC_RATE;
  state.vad.reset();
  if (!state.handsFree) mic.stop();
  setVadState(state.handsFree ? 'listening…' : 'Microphone off.');
  const samples = concat(ptt.frames);
  if (samples.length < 0.3 * rate) {
    note('push to talk: too short to send');
    return;
  }
  if (state.mode === 'chat') sendSpoken(samples);
  else addCaption(samples, ptt.start, ptt.start + samples.length / rate);
}

// ---- chat turns ----

// Samples at 16 kHz (the microphone's sound is resampled as it arrives).
function sendSpoken(samples) {
  const endedAt = performance.now(); // the end of the user's speech, as the page knows it
  const wav = encodeWav(samples, MIC_RATE);
  const seconds = (wav.length - 44) / 2 / MIC_RATE;
  const message = {
    role: 'user',
    content: [{ type: 'input_audio', input_audio: { data: bytesToBase64(wav), format: 'wav' } }],
  };
  sendTurn(message, `(spoken, ${seconds.toFixed(1)} s)`, endedAt);
}

function sendTyped(text) {
  player.ensure();
  sendTurn({ role: 'user', content: [{ type: 'text', text }] }, text, performance.now());
}

// Sampling can be set in the page's address, e.g. /?temperature=0 for greedy answers, /?seed=1 for
// repeatable ones, /?max_tokens=200 for short ones: the numbers go into every chat request as they are.
const OPTIONS = Object.fromEntries(['temperature', 'seed', 'max_tokens']
  .map((name) => [name, new URLSearchParams(location.search).get(name)])
  .filter(([, value]) => value !== null && value !== '' && Number.isFinite(Number(value)))
  .map(([name, value]) => [name, Number(value)]));

function requestBody() {
  const body = { model: MODEL, stream: true, ...OPTIONS, messages: [...state.history] };
  if (ui.speak.checked) {
    body.modalities = ['text', 'audio'];
    body.audio = { voice: ui.voice.value, format: 'pcm16' };
  } else {
    body.modalities = ['text'];
  }
  return body;
}

// One turn: the user's message joins the history at once (so that a turn spoken over this answer follows
// it); the answer joins it only once complete. A refused request takes its user turn back out.
async function sendTurn(message, label, endedAt) {
  interrupt('a new turn');
  clearError();
  const userEl = addEntry('user', label);
  state.history.push(message);
  const body = requestBody();
  state.lastRequestBody = body;
  const answer = {
    controller: new AbortController(), endedAt, message, userEl, el: addEntry('assistant', ''),
    text: '', id: null, seconds: 0, firstAudioMs: null, firstTextMs: null, finish: null, received: false,
    decoder: new Pcm16Decoder(), underruns: player.underruns,
  };
  state.answer = answer;
  setStatus('thinking…');
  try {
    await receive(answer, body);
    finishAnswer(answer);
  } catch (e) {
    failAnswer(answer, e);
  }
}

// Streams the answer in. The server queues a request it has no row for yet (it never answers "busy").
async function receive(answer, body) {
  for await (const chunk of streamChat(body, answer.controller.signal)) onChunk(answer, chunk);
}

function onChunk(answer, chunk) {
  answer.received = true;
  const choice = chunk.choices && chunk.choices[0];
  if (!choice) return;
  const delta = choice.delta || {};
  if (delta.audio) {
    if (delta.audio.id) answer.id = delta.audio.id;
    if (delta.audio.transcript) addText(answer, delta.audio.transcript);
    if (delta.audio.data) playPiece(answer, delta.audio.data);
  }
  if (typeof delta.content === 'string' && delta.content) addText(answer, delta.content);
  if (choice.finish_reason) answer.finish = choice.finish_reason;
}

function addText(answer, piece) {
  if (answer.firstTextMs === null) answer.firstTextMs = performance.now() - answer.endedAt;
  answer.text += piece;
  answer.el.textContent = answer.text;
  ui.log.scrollTop = ui.log.scrollHeight;
}

function playPiece(answer, base64) {
  const samples = answer.decoder.push(base64ToBytes(base64));
  if (samples.length === 0) return;
  const startsAt = player.play(samples);
  if (answer.firstAudioMs === null) answer.firstAudioMs = startsAt - answer.endedAt;
  answer.seconds += samples.length / ANSWER_RATE;
  setStatus(`answering… ${answer.seconds.toFixed(1)} s of sound received`);
}

function metrics(answer) {
  const parts = [
    answer.firstAudioMs === null ? 'no audio' : `first audio ${Math.round(answer.firstAudioMs)} ms`,
    `${answer.seconds.toFixed(1)} s of audio`,
  ];
  if (answer.firstTextMs !== null) parts.push(`first text ${Math.round(answer.firstTextMs)} ms`);
  const gaps = player.underruns - answer.underruns;
  if (gaps) parts.push(`${gaps} gap${gaps > 1 ? 's' : ''} in playback`);
  if (answer.finish === 'length') parts.push('cut at the length limit');
  else if (answer.finish && answer.finish !== 'stop') parts.push(`ended: ${answer.finish}`);
  return parts.join(' · ');
}

function finishAnswer(answer) {
  if (state.answer !== answer) return; // interrupted at the last moment: interrupt() has dealt with it
  state.answer = null;
  state.history.push(answer.id
    ? { role: 'assistant', content: null, audio: { id: answer.id } }
    : { role: 'assistant', content: answer.text });
  answer.el.dataset.meta = metrics(answer);
  setStatus(metrics(answer));
}

function failAnswer(answer, error) {
  if (answer.controller.signal.aborted) return; // interrupt() has said why and dropped it
  if (state.answer === answer) state.answer = null;
  if (!answer.received) {
    // Refused, or the server is unreachable: the turn never happened, so it leaves the history too.
    const i = state.history.indexOf(answer.message);
    if (i >= 0) state.history.splice(i, 1);
    answer.el.remove();
    answer.userEl.classList.add('failed');
    answer.userEl.dataset.meta = 'not answered: not in the history';
    setStatus('');
    showError(`${error.message} (this turn is not kept in the history)`);
    if (error.status === 401) askForKey();
  } else {
    answer.el.classList.add('aborted');
    answer.el.dataset.meta = 'broken off: not in the history';
    setStatus('');
    showError(`${error.message} (the partial answer is not kept in the history)`);
  }
}

// Stops playback and abandons the answer in progress; an abandoned answer is dropped from the history
// (only complete answers are cited), the user's turn before it stays.
function interrupt(reason) {
  const wasPlaying = player.playing;
  player.stop();
  const answer = state.answer;
  if (answer) {
    state.answer = null;
    answer.controller.abort();
    answer.el.classList.add('aborted');
    answer.el.dataset.meta = `interrupted (${reason}): not in the history`;
    if (!answer.text) answer.el.remove();
    setStatus('');
    note(`answer interrupted (${reason}): it is dropped from the history`);
  } else if (wasPlaying) {
    note(`playback stopped (${reason}); the answer stays in the history`);
  }
}

function reset() {
  interrupt('reset');
  state.history = [];
  state.lastRequestBody = null;
  ui.log.replaceChildren();
  setStatus('');
  clearError();
  note('history reset');
}

// ---- live captions ----

function beginCaptions() {
  if (state.captionOrigin === null && state.vad) state.captionOrigin = state.vad.samples / state.vad.rate;
}

function addCaption(samples, start, end) {
  beginCaptions();
  const wav = encodeWav(samples, MIC_RATE);
  const caption = {
    start: start - state.captionOrigin, end: end - state.captionOrigin, text: null, status: 'pending',
    error: null, wav: bytesToBase64(wav),
  };
  state.captions.push(caption);
  renderCaptions();
  transcribeCaption(caption, wav);
}

// Chunks are sent as they end, without waiting for the answers before them; each answer is shown in the
// same step as it is stored, so that the list on screen and window.lfm2.captions never disagree.
async function transcribeCaption(caption, wav) {
  try {
    caption.text = await transcribe(wav);
    caption.status = 'done';
  } catch (e) {
    Object.assign(caption, { status: 'failed', error: e.message });
    showError(`captions: ${e.message}`);
    if (e.status === 401) askForKey();
  }
  renderCaptions();
}

// Captions appear in order: each one once it and all before it have their answer.
function renderCaptions() {
  let shown = 0;
  for (const caption of state.captions) {
    if (caption.status === 'pending') break;
    if (shown >= ui.captions.children.length) ui.captions.append(captionItem(caption));
    shown++;
  }
  const waiting = state.captions.length - shown;
  if (waiting) setVadState(`transcribing ${waiting} chunk${waiting > 1 ? 's' : ''}…`);
  else if (ui.vadState.textContent.startsWith('transcribing')) setVadState(state.handsFree ? 'listening…' : 'Microphone off.');
}

function captionItem(caption) {
  const li = document.createElement('li');
  const time = document.createElement('time');
  time.textContent = `${caption.start.toFixed(1)}–${caption.end.toFixed(1)} s`;
  const text = document.createElement('span');
  if (caption.status === 'failed') {
    text.className = 'failed';
    text.textContent = `(failed: ${caption.error})`;
  } else {
    text.textContent = caption.text.trim() || '(nothing heard)';
    if (!caption.text.trim()) text.className = 'pending';
  }
  li.append(time, text);
  return li;
}

function saveCaptions(format) {
  const { build, type } = FORMATS[format];
  const done = state.captions.filter((c) => c.status === 'done');
  const name = `captions.${format}`;
  const blob = download(name, build(done), type);
  state.lastDownload = { name, blob };
  note(`saved ${name} (${done.length} captions)`);
}

function clearCaptions() {
  state.captions = [];
  state.captionOrigin = null;
  ui.captions.replaceChildren();
  if (state.handsFree && state.mode === 'captions') beginCaptions();
}

// ---- the API key (serve.py --api-key) ----

function askForKey() {
  ui.keyRow.hidden = false;
  ui.apiKey.focus();
}

function bindKey() {
  // Kept for this tab only: sessionStorage, not localStorage.
  const saved = sessionStorage.getItem('lfm2-api-key') || '';
  ui.apiKey.value = saved;
  setApiKey(saved);
  if (saved) ui.keyRow.hidden = false;
  ui.apiKey.addEventListener('change', () => {
    setApiKey(ui.apiKey.value.trim());
    sessionStorage.setItem('lfm2-api-key', ui.apiKey.value.trim());
    note('API key set');
  });
}

// ---- wiring ----

function setMode(mode) {
  if (mode === state.mode) return;
  if (mode === 'captions') interrupt('switched to live captions');
  state.mode = mode;
  ui.chatPanel.hidden = mode !== 'chat';
  ui.captionsPanel.hidden = mode !== 'captions';
  if (state.vad) state.vad.reset();
  if (mode === 'captions' && state.handsFree) beginCaptions();
}

function bindSlider(input, output, unit, apply) {
  const update = () => {
    output.textContent = `${input.value} ${unit}`;
    if (state.vad) apply(state.vad, Number(input.value));
  };
  input.addEventListener('input', update);
  update();
}

function wire() {
  ui.start.addEventListener('click', () => (state.handsFree ? stopListening() : startListening()));
  ui.stop.addEventListener('click', () => {
    interrupt('stopped');
    pttEnd();
  });
  ui.reset.addEventListener('click', reset);
  ui.form.addEventListener('submit', (e) => {
    e.preventDefault();
    const text = ui.text.value.trim();
    if (!text) return;
    ui.text.value = '';
    sendTyped(text);
  });
  ui.ptt.addEventListener('pointerdown', (e) => {
    if (e.button !== 0) return;
    e.preventDefault();
    ui.ptt.setPointerCapture(e.pointerId);
    state.pttHeld = true;
    pttStart(false);
  });
  const release = () => {
    if (!state.pttHeld) return;
    state.pttHeld = false;
    pttEnd();
  };
  ui.ptt.addEventListener('pointerup', release);
  ui.ptt.addEventListener('pointercancel', release);
  ui.ptt.addEventListener('click', (e) => {
    if (e.detail !== 0) return; // a mouse or touch click: the hold above has done its work
    if (state.ptt) pttEnd();
    else pttStart(true);
  });
  for (const radio of document.querySelectorAll('input[name=mode]')) {
    radio.addEventListener('change', () => radio.checked && setMode(radio.value));
  }
  for (const button of document.querySelectorAll('[data-save]')) {
    button.addEventListener('click', () => saveCaptions(button.dataset.save));
  }
  $('clear-captions').addEventListener('click', clearCaptions);
  bindSlider(ui.pause, ui.pauseValue, 's', (vad, v) => { vad.pause = v; });
  bindSlider(ui.threshold, ui.thresholdValue, 'dB', (vad, v) => { vad.margin = v; });
  // Nothing fails silently: an error no handler caught still reaches the page.
  window.addEventListener('unhandledrejection', (e) => showError(`error: ${e.reason && e.reason.message || e.reason}`));
  window.addEventListener('error', (e) => showError(`error: ${e.message}`));
}

wire();
bindKey();
pollHealth();
