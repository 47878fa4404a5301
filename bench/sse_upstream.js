// The SSE upstream for the time-to-first-event scenario (Node, no packages): every request gets the
// first event at once, a second one 5 ms later, then the end of the stream.
'use strict';
const http = require('http');

const port = Number(process.argv[2]);
const server = http.createServer((req, res) => {
  req.resume();
  res.writeHead(200, { 'Content-Type': 'text/event-stream', 'Cache-Control': 'no-cache' });
  res.write('event: message\ndata: {"delta":"first"}\n\n');
  setTimeout(() => {
    res.write('data: {"delta":"second"}\n\n');
    res.end('data: [DONE]\n\n');
  }, 5);
});
server.keepAliveTimeout = 75000;
server.listen(port, '127.0.0.1', () => console.log('ready'));
process.on('SIGTERM', () => server.close(() => process.exit(0)));
