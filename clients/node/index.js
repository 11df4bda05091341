'use strict';
/**
 * Node.js client for loraserve. Loads the .proto files at run time (@grpc/proto-loader): no code
 * generation step.
 *
 *   const { LoraClient, status } = require('@loraserve/client');
 *   const client = new LoraClient('localhost:50051', { timeoutMs: 30000 });
 *   const out = await client.predict({ prompt: 'Hello', adapterId: 'my-task', maxNewTokens: 32 });
 *   for await (const chunk of client.predictStream({ prompt: 'Hello', adapterId: 'my-task' })) {
 *     process.stdout.write(chunk.text);
 *   }
 *   client.close();
 *
 * Errors are grpc-js ServiceErrors: compare `err.code` with `status` (e.g. status.NOT_FOUND for an
 * unknown adapter, status.INVALID_ARGUMENT for a bad request, status.DEADLINE_EXCEEDED when the
 * deadline passed). Every call that names an adapter also sends it as the `x-adapter-id` header, so
 * a proxy can route all requests for one adapter to the same replica (docs/deployment.md).
 */

const fs = require('fs');
const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

/** The header a proxy hashes on to keep one adapter's requests on one replica. */
const ADAPTER_HEADER = 'x-adapter-id';

const PROTO_FILES = ['loraserve/v1/inference.proto', 'loraserve/v1/adapter.proto', 'loraserve/v1/training.proto'];

/** The proto root: the package's own copy (made by `npm pack`), else the repository's proto/. */
function defaultProtoDir() {
  const bundled = path.join(__dirname, 'proto');
  return fs.existsSync(path.join(bundled, PROTO_FILES[0])) ? bundled : path.join(__dirname, '..', '..', 'proto');
}

/**
 * @typedef {Object} ClientOptions
 * @property {number} [timeoutMs] default deadline of every call, in milliseconds (none when unset)
 * @property {string} [apiKey] sent as `authorization: Bearer <key>` with every call
 * @property {string|Buffer} [rootCa] PEM of the CA that signed the server's certificate: turns TLS on
 * @property {boolean} [tls] TLS with the system's CAs (implied by rootCa)
 * @property {grpc.ChannelCredentials} [credentials] ready channel credentials (replace tls/rootCa)
 * @property {string} [protoDir] where loraserve/v1/*.proto live (default: bundled, else the repo's proto/)
 * @property {Object} [channelOptions] extra grpc-js channel options
 */

/**
 * @typedef {Object} ChatMessage
 * @property {string} role
 * @property {string} content
 */

/**
 * @typedef {Object} PredictParams
 * @property {string} [prompt] raw text, tokenized as is; give prompt or messages
 * @property {ChatMessage[]} [messages] a conversation rendered with the model's chat template
 * @property {string} [adapterId] '' or unset: the base model
 * @property {number} [maxNewTokens] 0: the server's default
 * @property {number} [temperature] 0: greedy
 * @property {number} [topP]
 * @property {number} [topK]
 * @property {number|string|bigint} [seed] uint64
 * @property {string[]} [stop]
 */

/**
 * @typedef {Object} CallOptions
 * @property {number} [timeoutMs] deadline of this call, in milliseconds (overrides the client's)
 * @property {AbortSignal} [signal] cancels the call
 */

/**
 * @typedef {Object} Completion
 * @property {string} text
 * @property {'stop'|'length'|'unknown'} finishReason
 * @property {number} promptTokens
 * @property {number} generatedTokens
 * @property {number} queueSeconds
 * @property {number} firstTokenSeconds
 * @property {number} totalSeconds
 */

/**
 * @typedef {Object} Chunk
 * @property {string} text the text since the previous chunk
 * @property {string} [finishReason] set on the last chunk only
 * @property {Completion} [completion] set on the last chunk only (the whole text and the usage)
 */

/**
 * @typedef {Object} Adapter
 * @property {string} adapterId
 * @property {'disk'|'cpu'|'gpu'|'unknown'} state
 * @property {number} rank
 * @property {number} alpha
 * @property {string[]} targetModules
 * @property {string} taskType
 * @property {number} sizeBytes
 * @property {string} error
 */

/**
 * @typedef {Object} TrainingEvent
 * @property {string} jobId
 * @property {Date|null} time
 * @property {'queued'|'started'|'progress'|'evaluation'|'completed'|'failed'|'cancelled'} type
 * @property {Object} data the event's fields (e.g. progress: step, totalSteps, loss, tokensPerSecond)
 */

/**
 * @typedef {Object} TrainParams
 * @property {string} adapterId the id the trained adapter is registered under
 * @property {{prompt?: string, completion?: string, messages?: ChatMessage[]}[]} [examples]
 * @property {string} [datasetPath] a JSONL file under the server's data root
 * @property {Object} [settings] TrainingSettings in camelCase, e.g. {rank: 8, learningRate: 1e-3,
 *   maxSteps: 100, lrScheduler: 'cosine', template: 'chat'}
 * @property {boolean} [overwrite]
 * @property {boolean} [truncate]
 */

const FINISH = { FINISH_REASON_STOP: 'stop', FINISH_REASON_LENGTH: 'length' };
const STATE = { ADAPTER_STATE_DISK: 'disk', ADAPTER_STATE_CPU: 'cpu', ADAPTER_STATE_GPU: 'gpu' };
const ENUM_PREFIX = { lrScheduler: 'LR_SCHEDULER_', template: 'PROMPT_TEMPLATE_' };

function completion(text, msg) {
  const usage = msg.usage || {};
  const timings = msg.timings || {};
  return {
    text,
    finishReason: FINISH[msg.finishReason] || 'unknown',
    promptTokens: usage.promptTokens || 0,
    generatedTokens: usage.generatedTokens || 0,
    queueSeconds: timings.queueSeconds || 0,
    firstTokenSeconds: timings.firstTokenSeconds || 0,
    totalSeconds: timings.totalSeconds || 0,
  };
}

function adapter(pb) {
  return {
    adapterId: pb.adapterId,
    state: STATE[pb.state] || 'unknown',
    rank: pb.rank,
    alpha: pb.alpha,
    targetModules: pb.targetModules || [],
    taskType: pb.taskType,
    sizeBytes: Number(pb.sizeBytes || 0),
    error: pb.error,
  };
}

function timestamp(ts) {
  if (!ts) return null;
  return new Date(Number(ts.seconds || 0) * 1000 + Math.floor((ts.nanos || 0) / 1e6));
}

function trainingEvent(pb) {
  const type = pb.kind;
  return { jobId: pb.jobId, time: timestamp(pb.time), type, data: type ? pb[type] : {} };
}

function settingsMessage(settings) {
  const out = {};
  for (const [key, value] of Object.entries(settings || {})) {
    if (ENUM_PREFIX[key] && typeof value === 'string' && !value.startsWith(ENUM_PREFIX[key])) {
      out[key] = ENUM_PREFIX[key] + value.toUpperCase();
    } else {
      out[key] = key === 'seed' ? String(value) : value;
    }
  }
  return out;
}

function predictRequest(p) {
  if (!p || (p.prompt === undefined && !p.messages)) throw new TypeError('give prompt or messages');
  const req = {
    adapterId: p.adapterId || '',
    prompt: p.prompt || '',
    messages: p.messages || [],
    sampling: {
      maxNewTokens: p.maxNewTokens || 0,
      temperature: p.temperature || 0,
      topK: p.topK || 0,
      stop: p.stop || [],
    },
  };
  if (p.topP !== undefined) req.sampling.topP = p.topP;
  if (p.seed !== undefined) req.sampling.seed = String(p.seed);
  return req;
}

/** Turns a server-streaming call into an async iterator that cancels the call when the loop stops early. */
async function* iterate(call, map) {
  try {
    for await (const msg of call) {
      yield map(msg);
    }
  } finally {
    call.cancel();
  }
}

class LoraClient {
  /**
   * @param {string} [target] host:port of a loraserve (or of a proxy in front of several)
   * @param {ClientOptions} [options]
   */
  constructor(target = 'localhost:50051', options = {}) {
    const def = protoLoader.loadSync(PROTO_FILES, {
      includeDirs: [options.protoDir || defaultProtoDir()],
      keepCase: false,
      longs: String,
      enums: String,
      defaults: true,
      oneofs: true,
    });
    const v1 = grpc.loadPackageDefinition(def).loraserve.v1;
    let creds = options.credentials;
    if (!creds) {
      creds = options.rootCa || options.tls
        ? grpc.credentials.createSsl(options.rootCa ? Buffer.from(options.rootCa) : null)
        : grpc.credentials.createInsecure();
    }
    const channelOptions = {
      'grpc.max_send_message_length': 64 * 1024 * 1024,
      'grpc.max_receive_message_length': 64 * 1024 * 1024,
      ...(options.channelOptions || {}),
    };
    this.timeoutMs = options.timeoutMs;
    this.apiKey = options.apiKey;
    this.inference = new v1.InferenceService(target, creds, channelOptions);
    const channelOverride = this.inference.getChannel();
    const shared = { ...channelOptions, channelOverride };
    this.adapters = new v1.AdapterService(target, creds, shared);
    this.training = new v1.TrainingService(target, creds, shared);
  }

  /** Metadata and call options of one call. */
  _call(opts = {}, adapterId = '') {
    const md = new grpc.Metadata();
    if (this.apiKey) md.set('authorization', `Bearer ${this.apiKey}`);
    if (adapterId) md.set(ADAPTER_HEADER, adapterId);
    const ms = opts.timeoutMs !== undefined ? opts.timeoutMs : this.timeoutMs;
    const callOptions = ms ? { deadline: new Date(Date.now() + ms) } : {};
    return [md, callOptions];
  }

  _unary(stub, method, request, opts, adapterId) {
    const [md, callOptions] = this._call(opts, adapterId);
    return new Promise((resolve, reject) => {
      const call = stub[method](request, md, callOptions, (err, res) => (err ? reject(err) : resolve(res)));
      if (opts && opts.signal) opts.signal.addEventListener('abort', () => call.cancel(), { once: true });
    });
  }

  _stream(stub, method, request, opts, adapterId) {
    const [md, callOptions] = this._call(opts, adapterId);
    const call = stub[method](request, md, callOptions);
    if (opts && opts.signal) opts.signal.addEventListener('abort', () => call.cancel(), { once: true });
    return call;
  }

  /**
   * One completion.
   * @param {PredictParams} params
   * @param {CallOptions} [opts]
   * @returns {Promise<Completion>}
   */
  async predict(params, opts = {}) {
    const res = await this._unary(this.inference, 'Predict', predictRequest(params), opts, params.adapterId);
    return completion(res.text, res);
  }

  /**
   * A completion streamed as text deltas; the last chunk carries finishReason and the completion.
   * @param {PredictParams} params
   * @param {CallOptions} [opts]
   * @returns {AsyncGenerator<Chunk>}
   */
  predictStream(params, opts = {}) {
    const request = predictRequest(params);
    const call = this._stream(this.inference, 'PredictStream', request, opts, params.adapterId);
    let text = '';
    return iterate(call, (msg) => {
      text += msg.textDelta;
      if (msg.finishReason && msg.finishReason !== 'FINISH_REASON_UNSPECIFIED') {
        const done = completion(text, msg);
        return { text: msg.textDelta, finishReason: done.finishReason, completion: done };
      }
      return { text: msg.textDelta };
    });
  }

  /**
   * Every adapter under the server's adapter root (all pages).
   * @param {{pageSize?: number}} [params]
   * @param {CallOptions} [opts]
   * @returns {Promise<Adapter[]>}
   */
  async listAdapters(params = {}, opts = {}) {
    const out = [];
    let pageToken = '';
    do {
      const res = await this._unary(this.adapters, 'ListAdapters', { pageSize: params.pageSize || 0, pageToken }, opts);
      out.push(...res.adapters.map(adapter));
      pageToken = res.nextPageToken;
    } while (pageToken);
    return out;
  }

  /**
   * @param {string} adapterId
   * @param {CallOptions} [opts]
   * @returns {Promise<Adapter>}
   */
  async getAdapter(adapterId, opts = {}) {
    const res = await this._unary(this.adapters, 'GetAdapter', { adapterId }, opts, adapterId);
    return adapter(res.adapter);
  }

  /**
   * Starts a training job and follows its events to the end (completed, failed or cancelled).
   * Stopping the loop early detaches; the job keeps training.
   * @param {TrainParams} params
   * @param {CallOptions} [opts]
   * @returns {AsyncGenerator<TrainingEvent>}
   */
  train(params, opts = {}) {
    const request = {
      adapterId: params.adapterId,
      examples: params.examples || [],
      datasetPath: params.datasetPath || '',
      settings: settingsMessage(params.settings),
      overwrite: !!params.overwrite,
      truncate: !!params.truncate,
    };
    const call = this._stream(this.training, 'Train', request, opts, params.adapterId);
    return iterate(call, (msg) => trainingEvent(msg.event));
  }

  close() {
    this.inference.close();
    this.adapters.close();
    this.training.close();
  }
}

module.exports = { LoraClient, status: grpc.status, Metadata: grpc.Metadata, ADAPTER_HEADER };
