#!/usr/bin/env bash
# Scaffolds a plain Node project in /workspace/<name>: an HTTP server on $PORT (5173 by
# default) and `dev`/`start` scripts.
# $1: the project name (validated: [a-z0-9][a-z0-9-_]{0,63}).
set -e
cd /workspace
mkdir -- "$1"
cd -- "$1"
npm init -y
cat > index.js <<'JS'
const http = require('http');
const port = Number(process.env.PORT) || 5173;
http.createServer((req, res) => {
  res.setHeader('content-type', 'text/html; charset=utf-8');
  res.end('<!doctype html><title>Node app</title><h1>Hello from Node ' + process.version + '</h1>');
}).listen(port, '0.0.0.0', () => console.log('listening on ' + port));
JS
npm pkg set scripts.dev="node index.js" scripts.start="node index.js"
