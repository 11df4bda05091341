'use strict';
// Lists the adapters, then asks the first one (or the base model) for a completion, unary and streamed.
//   node example.js [host:port]            (default localhost:50051; LORASERVE_API_KEY if the server has keys)
const { LoraClient, status } = require('./index');

async function main() {
  const target = process.argv[2] || process.env.LORASERVE_TARGET || 'localhost:50051';
  const client = new LoraClient(target, { timeoutMs: 60000, apiKey: process.env.LORASERVE_API_KEY });
  try {
    const adapters = await client.listAdapters();
    console.log(`adapters: ${adapters.map((a) => `${a.adapterId} (${a.state}, rank ${a.rank})`).join(', ') || 'none'}`);
    const adapterId = adapters.length ? adapters[0].adapterId : '';
    const out = await client.predict({ prompt: 'The capital of France is', adapterId, maxNewTokens: 16 });
    console.log(`predict [${adapterId || 'base'}]: ${JSON.stringify(out.text)} (${out.finishReason}, ` +
      `${out.generatedTokens} tokens in ${out.totalSeconds.toFixed(3)} s)`);
    process.stdout.write('stream: ');
    for await (const chunk of client.predictStream({ prompt: 'Once upon a time', adapterId, maxNewTokens: 16 },
      { timeoutMs: 30000 })) {
      process.stdout.write(chunk.text);
      if (chunk.completion) console.log(`\n(${chunk.finishReason}, ${chunk.completion.generatedTokens} tokens)`);
    }
    try {
      await client.getAdapter('no-such-adapter');
    } catch (err) {
      console.log(`getAdapter(no-such-adapter): ${err.code === status.NOT_FOUND ? 'NOT_FOUND' : err.code} ${err.details}`);
    }
  } finally {
    client.close();
  }
}

main().catch((err) => {
  console.error(err.message);
  process.exit(1);
});
