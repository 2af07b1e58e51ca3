// Builds the console into dist/: the page's own files from src/ and xterm.js + its fit add-on
// from node_modules (run `npm ci` first). No bundler: the page is plain ES modules.
// Usage: node build.mjs [OUT_DIR]   (default: dist)
import { copyFileSync, mkdirSync, readdirSync, rmSync, renameSync, existsSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));
const out = resolve(here, process.argv[2] || 'dist');
const files = [
  ['src/index.html', 'index.html'],
  ['src/app.js', 'app.js'],
  ['src/app.css', 'app.css'],
  ['src/favicon.svg', 'favicon.svg'],
  ['node_modules/@xterm/xterm/lib/xterm.mjs', 'xterm.mjs'],
  ['node_modules/@xterm/xterm/css/xterm.css', 'xterm.css'],
  ['node_modules/@xterm/addon-fit/lib/addon-fit.mjs', 'addon-fit.mjs'],
];

for (const [from] of files) {
  if (!existsSync(join(here, from))) {
    console.error(`build: ${from} is missing${from.startsWith('node_modules') ? ' (run npm ci first)' : ''}`);
    process.exit(1);
  }
}
// Build next to the target and swap it in, so a running server never sees half a console.
const tmp = `${out}.tmp-${process.pid}`;
rmSync(tmp, { recursive: true, force: true });
mkdirSync(tmp, { recursive: true });
for (const [from, to] of files) copyFileSync(join(here, from), join(tmp, to));
rmSync(out, { recursive: true, force: true });
renameSync(tmp, out);
console.log(`build: ${readdirSync(out).length} files in ${out}`);
