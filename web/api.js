// The server's OpenAI-shaped API, as the page uses it. Relative URLs: the page is served by the server itself.

export const MODEL = 'lfm2-audio';

// A server started with --api-key wants `Authorization: Bearer KEY` on its /v1 routes (not on /health).
let apiKey = '';
export function setApiKey(key) {
  apiKey = key;
}
const authorization = () => (apiKey ? { Authorization: `Bearer ${apiKey}` } : {});

// An answer the server refused: its HTTP status and the message of its JSON error body.
export class HttpError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

// fetch() rejects with a bare TypeError when nothing answers; say what that means.
async function request(url, options) {
  try {
    return await fetch(url, options);
  } catch (e) {
    if (e.name === 'AbortError') throw e;
    throw new Error('server down: cannot reach the server');
  }
}

async function refusal(response) {
  let message = `${response.status} ${response.statusText}`.trim();
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) message = `${response.status}: ${body.error.message}`;
  } catch {
    // not JSON (a proxy's error page, say): the status line is all there is
  }
  return new HttpError(response.status, `HTTP ${message}`);
}

export async function health(timeoutMs = 2500) {
  const response = await request('health', { cache: 'no-store', signal: AbortSignal.timeout(timeoutMs) });
  if (!response.ok) throw await refusal(response);
  return response.json();
}

// Server-sent events from a stream of text: `data:` lines, events ended by a blank line.
export class SseParser {
  constructor() {
    this.buffer = '';
  }

  // Text in; out: the data of each event completed by it.
  push(text) {
    this.buffer += text.replace(/\r\n?/g, '\n');
    const events = [];
    let end;
    while ((end = this.buffer.indexOf('\n\n')) >= 0) {
      const block = this.buffer.slice(0, end);
      this.buffer = this.buffer.slice(end + 2);
      const data = block
        .split('\n')
        .filter((line) => line.startsWith('data:'))
        .map((line) => line.slice(line.startsWith('data: ') ? 6 : 5));
      if (data.length) events.push(data.join('\n'));
    }
    return events;
  }
}

// POSTs a streaming chat request and yields each chunk's JSON; ends at `data: [DONE]`. A stream that stops
// before [DONE] and before a finish_reason is a broken stream, and throws.
export async function* streamChat(body, signal) {
  const response = await request('v1/chat/completions', {
    method: 'POST',
    headers: { 'Content-Type': 'application/json', Accept: 'text/event-stream', ...authorization() },
    body: JSON.stringify(body),
    signal,
  });
  if (!response.ok) throw await refusal(response);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  const parser = new SseParser();
  let finished = false;
  for (;;) {
    let part;
    try {
      part = await reader.read();
    } catch (e) {
      if (e.name === 'AbortError' || (signal && signal.aborted)) throw e;
      throw new Error(`the answer's stream broke: ${e.message}`);
    }
    if (part.done) break;
    for (const data of parser.push(part.value)) {
      if (data === '[DONE]') return;
      let chunk;
      try {
        chunk = JSON.parse(data);
      } catch {
        throw new Error(`the answer's stream sent something that is not JSON: ${data.slice(0, 80)}`);
      }
      if (chunk.error) throw new Error(`the server stopped the answer: ${chunk.error.message}`);
      if (chunk.choices && chunk.choices[0] && chunk.choices[0].finish_reason) finished = true;
      yield chunk;
    }
  }
  if (!finished) throw new Error("the answer's stream broke off before its end");
}

// One recording to text: POST /v1/audio/transcriptions as a form, like OpenAI's clients do.
export async function transcribe(wavBytes, signal) {
  const form = new FormData();
  form.append('file', new Blob([wavBytes], { type: 'audio/wav' }), 'chunk.wav');
  form.append('model', MODEL);
  form.append('response_format', 'json');
  const response = await request('v1/audio/transcriptions', {
    method: 'POST', body: form, signal, headers: authorization(),
  });
  if (!response.ok) throw await refusal(response);
  const body = await response.json();
  return typeof body.text === 'string' ? body.text : '';
}
