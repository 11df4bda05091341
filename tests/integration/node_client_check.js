'use strict';
// Driven by test_node_client.py: exercises clients/node against a running server and prints one JSON
// object of what it saw. Usage: node node_client_check.js host:port
const path = require('path');
const { LoraClient, status } = require(path.join(__dirname, '..', '..', 'clients', 'node'));

async function codeOf(promise) {
  try {
    await promise;
    return 'OK';
  } catch (err) {
    return Object.keys(status).find((k) => status[k] === err.code) || String(err.code);
  }
}

async function main() {
  const client = new LoraClient(process.argv[2], { timeoutMs: 60000 });
  const out = {};
  try {
    out.adapters = (await client.listAdapters({ pageSize: 2 })).map((a) => [a.adapterId, a.state, a.rank]);
    out.getAdapter = await client.getAdapter('a1');
    out.predict = await client.predict({ prompt: 'Hello there', adapterId: 'a0', maxNewTokens: 8, seed: 7 });
    out.predictBase = await client.predict({ messages: [{ role: 'user', content: 'Hi' }], maxNewTokens: 4 });
    const chunks = [];
    for await (const chunk of client.predictStream({ prompt: 'Hello there', adapterId: 'a0', maxNewTokens: 8 })) {
      chunks.push(chunk);
    }
    out.stream = chunks;
    // Stopping a stream early cancels it (the loop's return closes the call).
    let early = 0;
    for await (const chunk of client.predictStream({ prompt: 'Once upon', adapterId: 'a2', maxNewTokens: 200 })) {
      if (chunk.text !== undefined && ++early >= 2) break;
    }
    out.earlyChunks = early;
    out.errors = {
      unknownAdapter: await codeOf(client.predict({ prompt: 'x', adapterId: 'no-such-adapter', maxNewTokens: 2 })),
      badId: await codeOf(client.getAdapter('../escape')),
      missingAdapter: await codeOf(client.getAdapter('no-such-adapter')),
      tooManyTokens: await codeOf(client.predict({ prompt: 'x', maxNewTokens: 100000 })),
      deadline: await codeOf(client.predict({ prompt: 'Hello', adapterId: 'a0', maxNewTokens: 200 }, { timeoutMs: 1 })),
      streamUnknown: await codeOf((async () => {
        for await (const _ of client.predictStream({ prompt: 'x', adapterId: 'no-such-adapter' })) { /* none */ }
      })()),
    };
    const events = [];
    for await (const ev of client.train({
      adapterId: 'node-trained',
      examples: Array.from({ length: 4 }, (_, i) => ({ prompt: `Q${i}:`, completion: ` A${i}` })),
      settings: { rank: 4, maxSteps: 2, batchSize: 2, evalFraction: 0, lrScheduler: 'constant' },
    }, { timeoutMs: 120000 })) {
      events.push(ev);
    }
    out.train = events.map((e) => ({ type: e.type, jobId: e.jobId, hasTime: e.time instanceof Date, data: e.data }));
    out.trained = await client.getAdapter('node-trained');
  } finally {
    client.close();
  }
  process.stdout.write(JSON.stringify(out));
}

main().catch((err) => {
  console.error(err.stack || err.message);
  process.exit(1);
});
