// Captions as files: plain text, SubRip (.srt) and WebVTT (.vtt), built in the page.
// A caption is {start, end, text} with times in seconds since the captions began.

// 4.2 -> "00:00:04,200" (srt) or "00:00:04.200" (vtt).
export function timestamp(seconds, separator) {
  const ms = Math.max(0, Math.round(seconds * 1000));
  const pad = (n, width) => String(n).padStart(width, '0');
  const h = Math.floor(ms / 3600000);
  const m = Math.floor(ms / 60000) % 60;
  const s = Math.floor(ms / 1000) % 60;
  return `${pad(h, 2)}:${pad(m, 2)}:${pad(s, 2)}${separator}${pad(ms % 1000, 3)}`;
}

// Captions with no text (silence, a failed chunk) have nothing to show and are left out of the files.
const spoken = (captions) => captions.filter((c) => c.text && c.text.trim());

export function toTxt(captions) {
  return spoken(captions)
    .map((c) => `${c.text.trim()}\n`)
    .join('');
}

export function toSrt(captions) {
  return spoken(captions)
    .map((c, i) => `${i + 1}\n${timestamp(c.start, ',')} --> ${timestamp(c.end, ',')}\n${c.text.trim()}\n\n`)
    .join('');
}

export function toVtt(captions) {
  const cues = spoken(captions).map(
    (c) => `${timestamp(c.start, '.')} --> ${timestamp(c.end, '.')}\n${c.text.trim()}\n\n`,
  );
  return `WEBVTT\n\n${cues.join('')}`;
}

export const FORMATS = {
  txt: { build: toTxt, type: 'text/plain' },
  srt: { build: toSrt, type: 'application/x-subrip' },
  vtt: { build: toVtt, type: 'text/vtt' },
};

// Saves text as a file through a Blob URL (no server round trip). Returns the Blob, for tests.
export function download(name, text, type) {
  const blob = new Blob([text], { type: `${type};charset=utf-8` });
  const url = URL.createObjectURL(blob);
  const a = document.createElement('a');
  a.href = url;
  a.download = name;
  document.body.append(a);
  a.click();
  a.remove();
  // Revoking at once can cancel the download in some browsers; a minute later is safe.
  setTimeout(() => URL.revokeObjectURL(url), 60000);
  return blob;
}
