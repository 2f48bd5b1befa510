// Sound in and out of the page: the microphone, voice activity detection, resampling, WAV and PCM coding,
// and gapless playback of the streamed answer. No DOM here, so that these parts can be tested alone.

export const MIC_RATE = 16000; // what the model hears: 16 kHz mono
export const ANSWER_RATE = 24000; // what the server speaks: 16-bit mono PCM at 24 kHz
export const FRAME_SECONDS = 0.02; // the unit of voice activity detection

// ---- resampling ----

// Windowed-sinc resampling, as the sound arrives, so that a turn is ready to send the moment it ends.
// The capture runs at the device's rate (usually 44.1 or 48 kHz); linear interpolation down to 16 kHz
// would fold everything above 8 kHz back into the speech band, so the sinc is cut off below the lower of
// the two Nyquist frequencies. Polyphase: an output sample falls at one of a few fractional positions
// between input samples (160 for 44.1 -> 16 kHz, 1 for 48 -> 16 kHz), so the kernel is computed once
// per position, not once per sample. The output lags the input by the kernel's half-width (about 1 ms).
export class Resampler {
  constructor(fromRate, toRate) {
    this.from = fromRate;
    this.to = toRate;
    const cutoff = Math.min(1, toRate / fromRate) * 0.94; // of the input's Nyquist; 6% for the transition
    this.half = fromRate === toRate ? 1 : Math.ceil(12 / cutoff); // half-width: 12 zero crossings each side
    this.taps = 2 * this.half;
    this.phases = Math.min(toRate / gcd(fromRate, toRate), 4096); // exact below 4096, close above
    this.bank = fromRate === toRate ? null : kernelBank(cutoff, this.half, this.phases);
    this.pending = new Float32Array(this.half - 1); // silence before the first sample
    this.offset = -(this.half - 1); // the input index of pending[0]
    this.next = 0; // the index of the next output sample
  }

  // Input samples in; out: the output samples they complete.
  push(input) {
    if (!this.bank) return Float32Array.from(input);
    const buffer = new Float32Array(this.pending.length + input.length);
    buffer.set(this.pending);
    buffer.set(input, this.pending.length);
    const available = this.offset + buffer.length; // input samples known so far
    // Output j needs input up to floor(j * from / to) + half.
    const end = Math.max(this.next, Math.ceil(((available - this.half) * this.to) / this.from));
    const out = new Float32Array(end - this.next);
    for (let n = 0; n < out.length; n++) out[n] = this.sample(buffer, this.next + n);
    this.next = end;
    const keep = Math.floor((this.next * this.from) / this.to) - this.half + 1 - this.offset;
    this.pending = buffer.slice(Math.max(0, keep));
    this.offset += Math.max(0, keep);
    return out;
  }

  sample(buffer, j) {
    const position = (j * this.from) / this.to; // in input samples
    let base = Math.floor(position);
    let phase = Math.round((position - base) * this.phases);
    if (phase === this.phases) {
      base++;
      phase = 0;
    }
    const first = base - this.half + 1 - this.offset;
    const kernel = phase * this.taps;
    let sum = 0;
    for (let i = 0; i < this.taps; i++) sum += buffer[first + i] * this.bank[kernel + i];
    return sum;
  }
}

// A whole recording at once (its last millisecond padded with silence).
export function resample(input, fromRate, toRate) {
  const r = new Resampler(fromRate, toRate);
  const head = r.push(input);
  const tail = r.push(new Float32Array(r.half + 1));
  return concat([head, tail]).subarray(0, Math.floor((input.length * toRate) / fromRate));
}

function gcd(a, b) {
  return b === 0 ? a : gcd(b, a % b);
}

// bank[phase * taps + i]: the Hann-windowed sinc's weight of input sample (base - half + 1 + i) for an
// output at base + phase / phases.
function kernelBank(cutoff, half, phases) {
  const taps = 2 * half;
  const bank = new Float32Array(phases * taps);
  for (let p = 0; p < phases; p++) {
    for (let i = 0; i < taps; i++) {
      const x = p / phases - (i - half + 1); // distance from the output, in input samples
      const arg = Math.PI * cutoff * x;
      const sinc = arg === 0 ? 1 : Math.sin(arg) / arg;
      const window = Math.abs(x) >= half ? 0 : 0.5 + 0.5 * Math.cos((Math.PI * x) / half);
      bank[p * taps + i] = cutoff * sinc * window;
    }
  }
  return bank;
}

// ---- WAV, PCM and base64 ----

// 16-bit PCM mono WAV file of `samples` (floats in [-1, 1], clipped).
export function encodeWav(samples, sampleRate) {
  const bytes = new Uint8Array(44 + 2 * samples.length);
  const view = new DataView(bytes.buffer);
  const text = (offset, s) => [...s].forEach((c, i) => view.setUint8(offset + i, c.charCodeAt(0)));
  text(0, 'RIFF');
  view.setUint32(4, 36 + 2 * samples.length, true);
  text(8, 'WAVE');
  text(12, 'fmt ');
  view.setUint32(16, 16, true); // fmt chunk size
  view.setUint16(20, 1, true); // PCM
  view.setUint16(22, 1, true); // mono
  view.setUint32(24, sampleRate, true);
  view.setUint32(28, 2 * sampleRate, true); // bytes per second
  view.setUint16(32, 2, true); // bytes per frame
  view.setUint16(34, 16, true); // bits per sample
  text(36, 'data');
  view.setUint32(40, 2 * samples.length, true);
  for (let i = 0; i < samples.length; i++) {
    const s = Math.max(-1, Math.min(1, samples[i]));
    view.setInt16(44 + 2 * i, Math.round(s * 32767), true);
  }
  return bytes;
}

export function bytesToBase64(bytes) {
  // String.fromCharCode(...bytes) overflows the call stack on long recordings: go in slices.
  let binary = '';
  for (let i = 0; i < bytes.length; i += 0x8000) {
    binary += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  }
  return btoa(binary);
}

export function base64ToBytes(b64) {
  const binary = atob(b64);
  const bytes = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
  return bytes;
}

// 16-bit little-endian PCM arriving in pieces -> float samples. A piece may in principle end in the middle
// of a sample, so an odd byte is kept for the next piece.
export class Pcm16Decoder {
  constructor() {
    this.carry = null;
  }

  push(bytes) {
    if (this.carry !== null) {
      const joined = new Uint8Array(bytes.length + 1);
      joined[0] = this.carry;
      joined.set(bytes, 1);
      bytes = joined;
      this.carry = null;
    }
    if (bytes.length % 2) {
      this.carry = bytes[bytes.length - 1];
      bytes = bytes.subarray(0, bytes.length - 1);
    }
    const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.length);
    const out = new Float32Array(bytes.length / 2);
    for (let i = 0; i < out.length; i++) out[i] = view.getInt16(2 * i, true) / 32768;
    return out;
  }
}

export function concat(frames) {
  const out = new Float32Array(frames.reduce((n, f) => n + f.length, 0));
  let offset = 0;
  for (const f of frames) {
    out.set(f, offset);
    offset += f.length;
  }
  return out;
}

// ---- voice activity detection ----

export function frameDb(frame) {
  let sum = 0;
  for (let i = 0; i < frame.length; i++) sum += frame[i] * frame[i];
  return 10 * Math.log10(sum / frame.length + 1e-10);
}

// Energy-based voice activity detection with an adaptive noise floor and a hangover.
//
// A frame is "voiced" when its level is `margin` dB above the noise floor, and within `range` dB of the
// recent speech's level. Speech starts after `onset` voiced frames in a row (one click is not speech) and
// ends after `pause` seconds without two voiced frames in a row (the hangover: speakers pause between
// words; a lone noisy frame does not prolong it).
// The noise floor is the average level (in dB) of the frames that are not voiced, or barely: it falls
// fast and rises in about a second. It has to be quick, and the speech level is there too, because the
// browser's own processing (automatic gain, noise suppression) lifts the noise by 10 dB right after an
// utterance; a floor that learnt the noise before it would take that louder noise for more speech.
// Clearly voiced frames lift the floor only once a segment has gone on for `stuck` seconds: a noise that
// got louder for good (a fan switched on) ends as speech, in time.
// A segment keeps `preroll` seconds before the onset (the soft start of a word is below the threshold)
// and `tail` seconds after the last voiced frame; the rest of the pause is not sent.
export class Vad {
  constructor(sampleRate, options = {}) {
    this.rate = sampleRate;
    this.pause = options.pause ?? 0.7; // seconds of silence that end a segment
    this.margin = options.margin ?? 10; // dB above the noise floor
    this.minDb = options.minDb ?? -70; // never below this: digital silence has no usable floor
    this.onset = options.onset ?? 3; // frames
    this.preroll = options.preroll ?? 0.3; // seconds
    this.tail = options.tail ?? 0.2; // seconds
    this.minSpeech = options.minSpeech ?? 0.25; // voiced seconds below which a segment is a noise, dropped
    this.maxSeconds = options.maxSeconds ?? 30; // a segment is cut here even without a pause
    this.range = options.range ?? 35; // dB below the speech level that still count as speech
    this.stuck = options.stuck ?? 8; // seconds of one segment after which voiced frames lift the floor
    this.floor = null;
    this.speech = null; // the level of recent speech, dB
    this.samples = 0; // samples seen so far: the clock of segment times
    this.reset();
  }

  reset() {
    this.speaking = false;
    this.recent = []; // frames before the onset, for the pre-roll
    this.segment = [];
    this.segmentStart = 0;
    this.run = 0; // voiced frames in a row (before the onset) or silent frames in a row (after it)
    this.voicedRun = 0; // voiced frames in a row after the onset
    this.voiced = 0;
    this.lastVoiced = 0; // frames of the segment up to its last voiced frame
  }

  get threshold() {
    const overNoise = (this.floor ?? this.minDb) + this.margin;
    const underSpeech = this.speech === null ? -Infinity : this.speech - this.range;
    return Math.max(overNoise, underSpeech, this.minDb);
  }

  // One frame in; out: null, {type: 'start'}, {type: 'end', samples, start, end (seconds), cut} or
  // {type: 'discard'} (a segment too short to be speech).
  push(frame) {
    const db = frameDb(frame);
    this.level = db;
    const threshold = this.threshold;
    const isVoiced = db > threshold;
    this.trackFloor(db, isVoiced, threshold);
    this.trackSpeech(db, isVoiced);
    this.samples += frame.length;
    return this.speaking ? this.duringSpeech(frame, isVoiced) : this.duringSilence(frame, isVoiced);
  }

  trackFloor(db, isVoiced, threshold) {
    // All-zero frames (a stream starting, a muted track) say nothing about the room's noise.
    if (db <= -99) return;
    if (this.floor === null) this.floor = db;
    let rate;
    if (!isVoiced) rate = db < this.floor ? 0.1 : 0.03;
    else if (db < threshold + 3) rate = 0.03; // barely voiced: as likely a louder noise as speech
    else rate = this.speaking && this.segment.length * FRAME_SECONDS > this.stuck ? 0.005 : 0;
    this.floor += rate * (db - this.floor);
  }

  // Follows the loud frames of speech quickly and forgets them at 1 dB/s.
  trackSpeech(db, isVoiced) {
    if (this.speech !== null) this.speech -= 1 * FRAME_SECONDS;
    if (!isVoiced || !this.speaking) return;
    if (this.speech === null) this.speech = db;
    else if (db > this.speech) this.speech += 0.2 * (db - this.speech);
  }

  duringSilence(frame, isVoiced) {
    this.recent.push(frame);
    const keep = Math.ceil(this.preroll / FRAME_SECONDS) + this.onset;
    if (this.recent.length > keep) this.recent.shift();
    this.run = isVoiced ? this.run + 1 : 0;
    if (this.run < this.onset) return null;
    this.speaking = true;
    this.segment = this.recent;
    this.recent = [];
    this.segmentStart = this.samples - this.segment.reduce((n, f) => n + f.length, 0);
    this.voiced = this.run;
    this.lastVoiced = this.segment.length;
    this.run = 0;
    return { type: 'start' };
  }

  duringSpeech(frame, isVoiced) {
    this.segment.push(frame);
    this.voicedRun = isVoiced ? this.voicedRun + 1 : 0;
    if (isVoiced) {
      this.voiced++;
      this.lastVoiced = this.segment.length;
    }
    this.run = this.voicedRun >= 2 ? 0 : this.run + 1;
    const seconds = this.segment.length * FRAME_SECONDS;
    if (seconds >= this.maxSeconds) return this.finish(this.segment.length, true);
    if (this.run * FRAME_SECONDS < this.pause) return null;
    if (this.voiced * FRAME_SECONDS < this.minSpeech) {
      this.reset();
      return { type: 'discard' };
    }
    const tailFrames = Math.round(Math.min(this.tail, this.pause) / FRAME_SECONDS);
    return this.finish(Math.min(this.segment.length, this.lastVoiced + tailFrames), false);
  }

  finish(frames, cut) {
    const samples = concat(this.segment.slice(0, frames));
    const startSample = this.segmentStart;
    const start = startSample / this.rate;
    this.reset();
    if (cut) {
      // Still speaking: the next segment starts right here, with no new onset to wait for.
      this.speaking = true;
      this.segmentStart = startSample + samples.length;
    }
    return { type: 'end', samples, start, end: start + samples.length / this.rate, cut };
  }
}

// ---- the microphone ----

// Why getUserMedia failed, in words a user can act on.
export function micErrorMessage(error) {
  const name = error && error.name;
  if (name === 'NotAllowedError' || name === 'SecurityError') return 'microphone permission refused';
  if (name === 'NotFoundError' || name === 'OverconstrainedError') return 'no microphone found';
  if (name === 'NotReadableError') return 'the microphone cannot be opened (in use by another program?)';
  return `microphone error: ${error && error.message ? error.message : error}`;
}

// Captures the microphone through an AudioWorklet and calls onFrame(Float32Array) every FRAME_SECONDS at
// the capture context's own rate (this.rate), which the page resamples to 16 kHz as it arrives.
export class Mic {
  async start(onFrame) {
    if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
      // Browsers hide the microphone on plain http except for localhost.
      throw new Error('no microphone: this page needs https or http://localhost for microphone access');
    }
    let stream;
    try {
      stream = await navigator.mediaDevices.getUserMedia({
        audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: true, channelCount: 1 },
      });
    } catch (e) {
      throw new Error(micErrorMessage(e));
    }
    this.stream = stream;
    this.ctx = new AudioContext({ latencyHint: 'interactive' });
    await this.ctx.audioWorklet.addModule('mic-worklet.js');
    this.rate = this.ctx.sampleRate;
    this.source = this.ctx.createMediaStreamSource(stream);
    this.node = new AudioWorkletNode(this.ctx, 'mic-capture', {
      processorOptions: { frameSize: Math.round(this.rate * FRAME_SECONDS) },
    });
    this.node.port.onmessage = (e) => onFrame(e.data);
    this.source.connect(this.node);
    // The worklet writes no output; connecting it to the destination keeps it pulled by the graph.
    this.node.connect(this.ctx.destination);
    await this.ctx.resume();
    stream.getAudioTracks()[0].addEventListener('ended', () => this.onEnded && this.onEnded());
  }

  stop() {
    if (this.stream) this.stream.getTracks().forEach((t) => t.stop());
    if (this.ctx) this.ctx.close();
    this.stream = this.ctx = this.source = this.node = null;
  }

  get running() {
    return this.ctx != null;
  }
}

// ---- playback ----

// Plays the answer's PCM pieces back to back on one AudioContext: each piece is an AudioBufferSourceNode
// started exactly where the previous one ends, so there is no gap between pieces that arrive in time.
// A piece that arrives after the previous one has finished starts at once (an underrun, counted).
export class Player {
  constructor() {
    this.ctx = null;
    this.sources = new Set();
    this.nextTime = 0;
    this.underruns = 0;
  }

  // Called from a click or key press too, since browsers start audio only after a user gesture.
  ensure() {
    if (!this.ctx) {
      try {
        this.ctx = new AudioContext({ sampleRate: ANSWER_RATE, latencyHint: 'interactive' });
      } catch {
        this.ctx = new AudioContext({ latencyHint: 'interactive' }); // buffers at 24 kHz are resampled
      }
    }
    if (this.ctx.state === 'suspended') this.ctx.resume();
    return this.ctx;
  }

  // Schedules samples; returns when (performance.now() time, ms) they start to play.
  play(samples) {
    const ctx = this.ensure();
    const buffer = ctx.createBuffer(1, samples.length, ANSWER_RATE);
    buffer.copyToChannel(samples, 0);
    const source = ctx.createBufferSource();
    source.buffer = buffer;
    source.connect(ctx.destination);
    const earliest = ctx.currentTime + 0.005; // a few ms ahead, or the start is already in the past
    if (this.sources.size > 0 && this.nextTime < earliest) this.underruns++;
    const at = Math.max(this.nextTime, earliest);
    source.start(at);
    this.nextTime = at + buffer.duration;
    this.sources.add(source);
    source.onended = () => {
      this.sources.delete(source);
      if (this.sources.size === 0 && this.onIdle) this.onIdle();
    };
    return performance.now() + (at - ctx.currentTime) * 1000;
  }

  stop() {
    for (const source of this.sources) {
      source.onended = null;
      source.stop();
    }
    this.sources.clear();
    this.nextTime = 0;
  }

  get playing() {
    return this.sources.size > 0;
  }

  // Seconds of scheduled sound not yet played.
  get queued() {
    return this.ctx && this.playing ? Math.max(0, this.nextTime - this.ctx.currentTime) : 0;
  }
}
