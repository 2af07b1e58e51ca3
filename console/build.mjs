// Builds the console into dist/: the page's own files from src/ (plain ES modules, copied as
// they are), xterm.js + its fit add-on from node_modules, and the code editor (CodeMirror 6),
// which esbuild bundles from editor/main.js into one ES module, editor.js (run `npm ci` first).
// Usage: node build.mjs [OUT_DIR]   (default: dist)
import { copyFileSync, mkdirSync, readdirSync, readFileSync, rmSync, renameSync, existsSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));
const out = resolve(here, process.argv[2] || 'dist');
const files = [
  ['src/index.html', 'index.html'],
  ['src/app.js', 'app.js'],
  ['src/files.js', 'files.js'],
  ['src/app.css', 'app.css'],
  ['src/favicon.svg', 'favicon.svg'],
  ['node_modules/@xterm/xterm/lib/xterm.mjs', 'xterm.mjs'],
  ['node_modules/@xterm/xterm/css/xterm.css', 'xterm.css'],
  ['node_modules/@xterm/addon-fit/lib/addon-fit.mjs', 'addon-fit.mjs'],
];

for (const from of [...files.map(([f]) => f), 'editor/main.js', 'node_modules/esbuild/package.json']) {
  if (!existsSync(join(here, from))) {
    console.error(`build: ${from} is missing${from.startsWith('node_modules') ? ' (run npm ci first)' : ''}`);
    process.exit(1);
  }
}
const esbuild = await import('esbuild');

// Build next to the target and swap it in, so a running server never sees half a console.
const tmp = `${out}.tmp-${process.pid}`;
rmSync(tmp, { recursive: true, force: true });
mkdirSync(tmp, { recursive: true });
for (const [from, to] of files) copyFileSync(join(here, from), join(tmp, to));
await esbuild.build({
  entryPoints: [join(here, 'editor/main.js')],
  outfile: join(tmp, 'editor.js'),
  bundle: true,
  format: 'esm',
  target: 'es2020',
  minify: true,
  legalComments: 'none',
  logLevel: 'warning',
});
// The console's CSP has no 'unsafe-eval': a bundle that needs it would fail in the browser.
const bundle = readFileSync(join(tmp, 'editor.js'), 'utf8');
if (/\beval\(|new Function\(/.test(bundle)) {
  console.error('build: editor.js uses eval or new Function, which the console CSP refuses');
  process.exit(1);
}
rmSync(out, { recursive: true, force: true });
renameSync(tmp, out);
console.log(`build: ${readdirSync(out).length} files in ${out} (editor.js ${Math.round(bundle.length / 1024)} KiB)`);
