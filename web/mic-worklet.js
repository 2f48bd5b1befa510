// AudioWorklet processor: hands the microphone's samples to the page in fixed-size frames.
//
// The audio thread calls process() with 128-sample blocks; posting every block would flood the main thread
// with messages, so the blocks are gathered into frames of `frameSize` samples (the page asks for 20 ms),
// which is also the unit the page's voice activity detection works on. Several input channels are mixed
// down to mono here, once, rather than in the page.

class MicCapture extends AudioWorkletProcessor {
  constructor(options) {
    super();
    this.frameSize = options.processorOptions.frameSize;
    this.frame = new Float32Array(this.frameSize);
    this.filled = 0;
  }

  process(inputs) {
    const channels = inputs[0];
    if (!channels || channels.length === 0) return true; // input not connected yet: keep the node alive
    const n = channels[0].length;
    for (let i = 0; i < n; i++) {
      let sum = 0;
      for (let c = 0; c < channels.length; c++) sum += channels[c][i];
      this.frame[this.filled++] = sum / channels.length;
      if (this.filled === this.frameSize) {
        // Transfer the buffer (no copy) and start a fresh one.
        this.port.postMessage(this.frame, [this.frame.buffer]);
        this.frame = new Float32Array(this.frameSize);
        this.filled = 0;
      }
    }
    return true;
  }
}

registerProcessor('mic-capture', MicCapture);
