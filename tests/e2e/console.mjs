// End-to-end test of the web console in Debian's Chromium, driven by playwright-core.
// tests/it/console.rs starts a real sandboxd and runs this script; it can also be run by hand:
//
//   SANDBOXD_E2E_BASE=http://127.0.0.1:8080 SANDBOXD_E2E_TOKEN=$(target/release/sandboxd token 1) node tests/e2e/console.mjs
//
// (sandboxd ignores SANDBOXD_E2E_*, SANDBOXD_TEST_* and SANDBOXD_BENCH_* variables, so the
// line works in a shell that exports them too.)
//
// Steps: paste the token, start the sandbox, `echo hello` in the terminal, the file tree
// following a file the terminal writes (and deleting it from the tree), a React + Vite (or Node)
// project shown in the preview iframe, its `src/App.jsx` opened from the tree in the editor,
// changed and saved, and the new text in the preview frame (HMR), run code in JavaScript and in
// Python. A screenshot per step goes to
// SANDBOXD_E2E_ARTIFACTS (default tests/artifacts/console). Every wait is bounded; the whole
// run is bounded by SANDBOXD_E2E_DEADLINE_S (default 480). Exit 0 = passed.
import { mkdirSync, mkdtempSync, rmSync, writeFileSync, appendFileSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));
const base = (process.env.SANDBOXD_E2E_BASE || '').replace(/\/$/, '');
const token = process.env.SANDBOXD_E2E_TOKEN || '';
const artifacts = resolve(process.env.SANDBOXD_E2E_ARTIFACTS || join(here, '..', 'artifacts', 'console'));
const chromiumPath = process.env.SANDBOXD_E2E_CHROMIUM || '/usr/bin/chromium';
const deadlineS = Number(process.env.SANDBOXD_E2E_DEADLINE_S || 480);
// SANDBOXD_E2E_PROJECT=0 leaves out the project step; =node creates the small Node project
// instead of React + Vite (the default).
const projectKind = { 0: null, node: 'node', 'react-vite': 'react-vite' }[process.env.SANDBOXD_E2E_PROJECT || 'react-vite'];
// SANDBOXD_E2E_PREVIEW_URL: the preview URL the console must show (e.g. the HTTP one when the
// console is on HTTP, even with the HTTPS listener on).
const expectPreviewUrl = process.env.SANDBOXD_E2E_PREVIEW_URL || '';
// SANDBOXD_E2E_PREVIEW_ACCESS=owner: the server runs with preview_access = "owner", so the
// frame must open through a signed link.
const ownerPreview = process.env.SANDBOXD_E2E_PREVIEW_ACCESS === 'owner';
// SANDBOXD_E2E_IGNORE_TLS=1 accepts the development certificate (HTTPS run).
const ignoreTls = process.env.SANDBOXD_E2E_IGNORE_TLS === '1';

if (!base || !token) {
  console.error('console.mjs: set SANDBOXD_E2E_BASE and SANDBOXD_E2E_TOKEN');
  process.exit(2);
}

let chromium;
try {
  ({ chromium } = await import('playwright-core'));
} catch (e) {
  console.error(`console.mjs: playwright-core is missing (${e.message}); run scripts/ensure-browser.sh`);
  process.exit(3);
}

mkdirSync(artifacts, { recursive: true });
const logFile = join(artifacts, 'browser-console.log');
writeFileSync(logFile, '');
const t0 = Date.now();
const log = (msg) => console.log(`[e2e +${((Date.now() - t0) / 1000).toFixed(1)}s] ${msg}`);

const killer = setTimeout(() => {
  console.error(`console.mjs: the whole run exceeded ${deadlineS} s`);
  process.exit(4);
}, deadlineS * 1000);
killer.unref();

const profile = mkdtempSync(join(tmpdir(), 'sandboxd-e2e-chromium-'));
const context = await chromium.launchPersistentContext(profile, {
  executablePath: chromiumPath,
  headless: true,
  args: [
    '--no-sandbox',
    '--disable-gpu',
    '--disable-quic',
    '--no-first-run',
    '--disable-background-networking',
    '--disable-component-update',
    '--disable-sync',
    // localhost names as IP literals: no host-resolver job that Chromium would abort with
    // ERR_NETWORK_CHANGED whenever Docker adds or removes an interface on this machine.
    '--host-resolver-rules=MAP localhost 127.0.0.1, MAP *.localhost 127.0.0.1',
  ],
  viewport: { width: 1440, height: 900 },
  ignoreHTTPSErrors: ignoreTls,
  timeout: 30_000,
});
const page = context.pages()[0] || (await context.newPage());
page.setDefaultTimeout(15_000);

// Problems of the console page itself (not of the app in the preview) fail the test.
const problems = [];
page.on('console', (m) => {
  const url = (m.location() && m.location().url) || '';
  appendFileSync(logFile, `${m.type()} ${url} ${m.text()}\n`);
  const ours = url.startsWith(base) || url === '';
  if (ours && m.type() === 'error' && /Content Security Policy|Refused to/i.test(m.text())) {
    problems.push(`CSP: ${m.text()}`);
  }
});
// Requests that Chromium aborted because Docker changed the host's interfaces (any frame).
let networkChanges = 0;
page.on('requestfailed', (r) => {
  const why = r.failure() ? r.failure().errorText : '';
  if (why.includes('ERR_NETWORK_CHANGED')) networkChanges += 1;
  appendFileSync(logFile, `requestfailed ${r.url()} ${why}\n`);
});
page.on('pageerror', (e) => {
  appendFileSync(logFile, `pageerror ${e.message}\n`);
  problems.push(`page error: ${e.message}`);
});

/** The last `n` lines of the browser log (console messages, failed requests, page errors). */
function browserLogTail(n) {
  try {
    return readFileSync(logFile, 'utf8').trimEnd().split('\n').slice(-n);
  } catch (e) {
    return [`(no browser log: ${e.message})`];
  }
}

let shot = 0;
async function screenshot(name) {
  shot += 1;
  const file = join(artifacts, `${String(shot).padStart(2, '0')}-${name}.png`);
  await page.screenshot({ path: file });
  log(`screenshot ${file}`);
  return file;
}

async function text(sel) {
  return ((await page.locator(sel).textContent()) || '').trim();
}

/** Polls `fn` until it returns a truthy value; fails with `what` after `ms`. */
async function until(what, ms, fn, every = 250) {
  const end = Date.now() + ms;
  let last;
  for (;;) {
    try {
      last = await fn();
      if (last) return last;
    } catch (e) {
      last = e.message;
    }
    if (Date.now() > end) throw new Error(`timed out after ${ms / 1000} s waiting for ${what} (last: ${JSON.stringify(last)})`);
    await page.waitForTimeout(every);
  }
}

async function terminalLines() {
  return page.$$eval('#terminal .xterm-rows > div', (rows) =>
    rows.map((r) => (r.textContent || '').replace(/\u00a0/g, ' ').trimEnd()));
}

async function run() {
  // 1. Sign in by pasting the token.
  // Docker adding or removing an interface on this machine (this test's containers, or other
  // tests') makes Chromium abort requests in flight with ERR_NETWORK_CHANGED, the page or one of
  // its modules included: load it again, as a person would.
  for (let attempt = 1; ; attempt += 1) {
    try {
      await page.goto(`${base}/`, { waitUntil: 'load', timeout: 30_000 });
      await page.locator('#token').waitFor({ state: 'visible', timeout: 10_000 });
      break;
    } catch (e) {
      if (attempt === 4) throw e;
      log(`loading the console failed (${e.message.split('\n')[0]}): again`);
      await page.waitForTimeout(1000);
    }
  }
  await screenshot('signin');
  // A token the server refuses is answered in words.
  await page.locator('#token').fill('eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.bad');
  await page.getByRole('button', { name: 'Sign in' }).click();
  const refused = await until('the refusal in words', 15_000, async () => text('#signin-error'));
  if (!/unauthorized|refused/i.test(refused)) throw new Error(`unexpected sign-in error: ${refused}`);
  log(`bad token refused: ${refused}`);
  await page.locator('#token').fill(token);
  await page.getByRole('button', { name: 'Sign in' }).click();
  await page.locator('#app-view').waitFor({ state: 'visible' });
  const where = await page.evaluate(() => ({
    url: location.href,
    session: sessionStorage.getItem('sandboxd.token'),
    local: localStorage.length,
  }));
  if (where.url.includes(token.slice(-16)) || where.url.includes('token=')) throw new Error(`the token reached the URL: ${where.url}`);
  if (where.session !== token || where.local !== 0) throw new Error('the token is not (only) in sessionStorage');
  log(`signed in as user ${await text('#who-user')}`);

  // 2. Start the sandbox; the terminal connects by itself.
  await page.getByRole('button', { name: 'Start / wake' }).click();
  await until('the sandbox to be running', 90_000, async () => (await text('#sb-state')) === 'running');
  await until('the terminal to open', 30_000, async () => (await text('#term-state')) === 'open');
  const limits = await text('#sb-limits');
  if (!/MiB memory/.test(limits)) throw new Error(`limits not shown: ${limits}`);
  const shownPreview = await text('#sb-preview');
  log(`sandbox running; limits: ${limits}; preview ${shownPreview}`);
  if (expectPreviewUrl && shownPreview !== expectPreviewUrl) {
    throw new Error(`the console shows the preview URL ${shownPreview}, expected ${expectPreviewUrl}`);
  }
  // The preview frame shows the preview origin (the app is not there yet: the proxy's page
  // that retries by itself), not a browser error page.
  // When the browser runs on the sandboxd machine, Chromium may abort the frame's first load
  // with ERR_NETWORK_CHANGED (the new container's interface): then Reload, as a person would.
  const previewOrigin = new URL(shownPreview).origin;
  const previewFrame = () => page.frames().find((f) => f !== page.mainFrame());
  for (let attempt = 1; ; attempt += 1) {
    const seen = await until('the preview frame to load', 20_000, async () => {
      const u = previewFrame() && previewFrame().url();
      return u && u !== 'about:blank' ? u : null;
    });
    if (seen.startsWith(previewOrigin)) break;
    if (attempt === 5) throw new Error(`the preview frame shows ${seen}, not ${previewOrigin}`);
    log(`the preview frame shows ${seen} (a network change aborted it): Reload`);
    await page.waitForTimeout(1000 * attempt);
    const navigated = page.waitForEvent('framenavigated', { predicate: (f) => f !== page.mainFrame(), timeout: 20_000 });
    await page.getByRole('button', { name: 'Reload' }).click();
    await navigated;
  }
  await page.waitForTimeout(500);
  await screenshot('started');

  // 3. `echo hello` in the terminal: a row that is exactly `hello` is the command's output.
  await until('a shell prompt', 30_000, async () => (await terminalLines()).some((l) => /[$#]\s*$/.test(l)));
  await page.locator('#terminal').click();
  await page.keyboard.type('echo hello', { delay: 20 });
  await page.keyboard.press('Enter');
  await until('"hello" in the terminal', 20_000, async () => (await terminalLines()).some((l) => l.trim() === 'hello'));
  log('terminal echoed hello');
  await screenshot('terminal');

  // Resize follows the window: the PTY's size (stty size) matches the rows xterm.js shows.
  const size = async (n) => {
    await page.keyboard.type(`echo "size$((${n}*1)) $(stty size)"`, { delay: 5 });
    await page.keyboard.press('Enter');
    const re = new RegExp(`^size${n} (\\d+) (\\d+)$`);
    const line = await until(`stty size #${n}`, 15_000, async () => (await terminalLines()).map((l) => l.trim()).find((l) => re.test(l)));
    const [, rows, cols] = line.match(re).map(Number);
    return { rows, cols };
  };
  const before = await size(1);
  await page.setViewportSize({ width: 1100, height: 760 });
  await page.waitForTimeout(800);
  const after = await size(2);
  const shownRows = (await terminalLines()).length;
  if (after.cols === before.cols || after.rows !== shownRows) {
    throw new Error(`resize not applied: before ${JSON.stringify(before)}, after ${JSON.stringify(after)}, xterm rows ${shownRows}`);
  }
  log(`resize followed the window: ${before.cols}x${before.rows} -> ${after.cols}x${after.rows}`);
  await page.setViewportSize({ width: 1440, height: 900 });
  await page.waitForTimeout(500);

  await filesStep();

  if (projectKind) await projectStep(projectKind);
  else log('project step left out (SANDBOXD_E2E_PROJECT=0)');

  // 5. Run code: stdout, stderr, exit code, duration.
  await page.locator('#code').fill("console.log('answer', 6 * 7);\nconsole.error('to stderr');");
  await page.locator('#timeout').fill('10000');
  await page.getByRole('button', { name: 'Run', exact: true }).click();
  await until('the run result', 30_000, async () => {
    if (/could not reach sandboxd/.test(await text('#run-error'))) {
      log(`run code: ${await text('#run-error')}: Run again`);
      await page.getByRole('button', { name: 'Run', exact: true }).click();
    }
    return (await text('#run-stdout')).includes('answer 42');
  });
  const summary = await text('#run-summary');
  if (!/exit code 0 · \d+ ms/.test(summary)) throw new Error(`unexpected run summary: ${summary}`);
  if (!(await text('#run-stderr')).includes('to stderr')) throw new Error('stderr not shown');
  log(`run code: ${summary}`);
  await screenshot('run-code');

  // 5b. The language picker: Python.
  await page.locator('#language').selectOption('python');
  await page.locator('#code').fill('print(6*7)');
  await page.getByRole('button', { name: 'Run', exact: true }).click();
  await until('the Python run result', 30_000, async () => {
    if (/could not reach sandboxd/.test(await text('#run-error'))) {
      log(`run code: ${await text('#run-error')}: Run again`);
      await page.getByRole('button', { name: 'Run', exact: true }).click();
    }
    const err = await text('#run-error');
    if (err) throw new Error(`the Python run failed: ${err}`);
    return (await text('#run-stdout')) === '42';
  });
  log(`run Python: ${await text('#run-summary')}`);
  await screenshot('run-python');
  await page.locator('#language').selectOption('javascript');

  // 6. An API error is shown in words: a timeout the server refuses (422).
  await page.locator('#timeout').fill('0');
  await page.getByRole('button', { name: 'Run', exact: true }).click();
  const err = await until('the API error in words', 15_000, async () => text('#run-error'));
  if (!/timeoutMs/.test(err) || !/invalid_request/.test(err)) throw new Error(`unexpected error text: ${err}`);
  log(`API error shown: ${err}`);

  // 7. Stop: the sandbox is removed, the terminal closes, the preview goes away.
  await page.getByRole('button', { name: 'Stop' }).click();
  await until('the sandbox to be removed', 30_000, async () => (await text('#sb-state')) === 'removed');
  await until('the terminal to close', 10_000, async () => (await text('#term-state')) === 'closed');
  if (await page.locator('#preview').isVisible()) throw new Error('the preview is still shown after Stop');
  if (!(await page.locator('#tree-empty').isVisible())) throw new Error('the file tree is still shown after Stop');
  log('stopped');

  if (problems.length) throw new Error(`the console page reported problems:\n${problems.join('\n')}`);
}

// 3b. The file tree: it lists /workspace, follows a file that the terminal writes (the watch
// WebSocket) and deletes it again (with a confirm).
async function filesStep() {
  await until('the file tree to follow /workspace', 30_000, async () =>
    (await text('#watch-state')) === 'following' && page.locator('#tree .tree-item.root').isVisible());
  await page.locator('#terminal').click();
  await page.keyboard.type('echo made-in-the-terminal > /workspace/term-note.txt', { delay: 5 });
  await page.keyboard.press('Enter');
  const item = page.locator('#tree .tree-item[data-path="term-note.txt"]');
  await until('the terminal\'s file in the tree', 20_000, async () => (await item.count()) === 1);
  await item.click();
  await until('the file in the editor', 15_000, async () =>
    (await text('#editor-file')) === 'term-note.txt' && (await text('#editor .cm-content')).includes('made-in-the-terminal'));
  page.once('dialog', (d) => d.accept());
  await page.getByRole('button', { name: 'Delete', exact: true }).click();
  await until('the file to leave the tree', 15_000, async () => (await item.count()) === 0);
  if ((await text('#editor-file')) !== 'No file open') throw new Error('the deleted file is still open in the editor');
  log('file tree: followed a file written in the terminal, opened it, deleted it');
}

// 4b. The editor: open src/App.jsx of the React + Vite project from the tree, change the
// heading with the search panel's replace, save with Ctrl+S, and see the new heading in the
// preview frame without a reload of the frame (Vite's HMR).
async function editorStep(heading) {
  const wanted = 'Edited in sandboxd';
  for (const p of ['my-app', 'my-app/src']) {
    const dir = page.locator(`#tree .tree-item[data-path="${p}"]`);
    await until(`${p} in the tree`, 20_000, async () => (await dir.count()) === 1);
    if ((await dir.getAttribute('aria-expanded')) !== 'true') await dir.click();
  }
  const file = page.locator('#tree .tree-item[data-path="my-app/src/App.jsx"]');
  await until('App.jsx in the tree', 20_000, async () => (await file.count()) === 1);
  await file.click();
  await until('App.jsx in the editor', 15_000, async () =>
    (await text('#editor-file')) === 'my-app/src/App.jsx' && (await text('#editor .cm-content')).includes(heading));
  const lang = await text('#editor-lang');
  if (lang !== 'JavaScript (JSX)') throw new Error(`App.jsx is highlighted as ${lang}`);
  if (!(await page.locator('#editor .cm-content .cm-line span').count())) {
    throw new Error('no syntax highlighting in the editor');
  }
  let navigations = 0;
  const counter = (f) => { if (f !== page.mainFrame()) navigations += 1; };
  page.on('framenavigated', counter);
  await page.locator('#editor .cm-content').click({ position: { x: 8, y: 8 } });
  await page.keyboard.press('Control+f');
  await page.locator('#editor .cm-search input[name=search]').fill(heading);
  await page.locator('#editor .cm-search input[name=replace]').fill(wanted);
  await page.locator('#editor .cm-search button[name=replaceAll]').click();
  await until('the dirty marker', 5_000, async () => page.locator('#editor-dirty').isVisible());
  await page.locator('#editor .cm-search input[name=replace]').press('Escape');
  await page.keyboard.press('Control+s');
  await until('the save', 15_000, async () =>
    !(await page.locator('#editor-dirty').isVisible()) && (await text('#status')) === 'Saved my-app/src/App.jsx.');
  const frame = page.frameLocator('#preview');
  const changesBefore = networkChanges;
  const saved = Date.now();
  let reloaded = false;
  await until('the new heading in the preview frame', 60_000, async () => {
    const shown = ((await frame.locator('#root h1').first().textContent({ timeout: 2_000 })) || '').trim();
    if (shown === wanted) return true;
    // Only when a network change aborted requests (the hot update's fetch among them): Reload
    // once, as a person would; without one, the hot update itself must show the text.
    if (!reloaded && Date.now() - saved > 20_000 && networkChanges > changesBefore) {
      reloaded = true;
      log(`the hot update did not arrive and ${networkChanges - changesBefore} request(s) were aborted by network changes: Reload`);
      await page.getByRole('button', { name: 'Reload' }).click();
    }
    return false;
  }, 500);
  page.off('framenavigated', counter);
  log(`editor: saved App.jsx; the preview shows "${wanted}" (${navigations ? `after ${navigations} frame navigation(s)` : 'hot update, no reload'})`);
  // Find the new text (the editor scrolls to it) for the picture.
  await page.locator('#editor .cm-content').click({ position: { x: 8, y: 8 } });
  await page.keyboard.press('Control+f');
  await page.locator('#editor .cm-search input[name=search]').fill(wanted);
  // The panel takes the query on keyup: End (a no-op) first, then Enter finds it.
  await page.locator('#editor .cm-search input[name=search]').press('End');
  await page.locator('#editor .cm-search input[name=search]').press('Enter');
  await page.locator('#editor .cm-search input[name=search]').press('Escape');
  await page.waitForTimeout(500);
  await screenshot('editor');
}

// 4. A React + Vite (or Node) project, with visible progress, then its page in the iframe.
async function projectStep(kind) {
  const vite = kind === 'react-vite';
  await page.locator('#project-name').fill('my-app');
  await page.getByRole('button', { name: vite ? 'Create React + Vite project' : 'Create Node project' }).click();
  await page.locator('#job').waitFor({ state: 'visible', timeout: 30_000 });
  let progressShot = false;
  const jobEnd = await until('the project job to finish', 300_000, async () => {
    const state = await text('#job-state');
    if (!progressShot && state === 'running' && (await text('#job-log')).length > 0) {
      progressShot = true;
      log(`project step: ${await text('#job-step')}`);
      await screenshot('project-progress');
    }
    return state === 'running' ? null : state;
  }, 500);
  if (jobEnd !== 'succeeded') {
    throw new Error(`the project job ended ${jobEnd}: ${await text('#projects-error')}\n${await text('#job-log')}`);
  }
  log('project job succeeded');
  const frame = page.frameLocator('#preview');
  const previewFrame = () => page.frames().find((f) => f !== page.mainFrame());
  // Reloads (after network changes, or of a page left blank): at most 10, at least 3 s apart
  // (while Docker keeps adding interfaces, reloading every second only gets aborted again).
  let reloads = 0;
  let lastReload = 0;
  const mayReload = () => reloads < 10 && Date.now() - lastReload > 3000;
  let changesSeen = networkChanges;
  let blankSince = 0;
  const reload = async (why, pause = 0) => {
    reloads += 1;
    lastReload = Date.now();
    changesSeen = networkChanges;
    blankSince = 0;
    log(`${why}: Reload`);
    if (pause) await page.waitForTimeout(pause);
    await page.getByRole('button', { name: 'Reload' }).click();
    return null;
  };
  const heading = await until(`the ${kind} page in the preview iframe`, 120_000, async () => {
    // The waiting page refreshes itself, but a refresh that Docker's interface changes abort
    // (ERR_NETWORK_CHANGED) leaves Chromium's error page in the frame: Reload, as a person would.
    const shown = previewFrame() && previewFrame().url();
    if (shown && shown.startsWith('chrome-error:') && mayReload()) {
      return reload(`the preview frame shows ${shown} (a network change aborted it)`);
    }
    if (vite) {
      // Served by Vite's dev server (its client script) and rendered by React (#root filled).
      const client = await frame.locator('script[src="/@vite/client"]').count();
      const rendered = await frame.locator('#root *').count();
      // A module import that a network change aborted leaves #root empty: Reload.
      if (client && !rendered && networkChanges > changesSeen && mayReload()) {
        return reload('the app\'s modules were aborted by a network change', 1000);
      }
      // Vite's page is there but React rendered nothing for 20 s: a module request that
      // failed or a dependency re-optimisation whose reload message came before the HMR
      // socket was up (Vite answers the stale module 504 and waits for that socket). A person
      // reloads; the browser log says which requests failed.
      if (client && !rendered) {
        blankSince = blankSince || Date.now();
        if (Date.now() - blankSince > 20_000 && mayReload()) {
          log(`the browser log's last lines:\n  ${browserLogTail(8).join('\n  ')}`);
          return reload('the app\'s page stayed blank for 20 s');
        }
      } else {
        blankSince = 0;
      }
      if (!client || !rendered) return null;
      return (await frame.locator('#root h1').first().textContent({ timeout: 2_000 })) || '(no h1)';
    }
    const h1 = (await frame.locator('h1').first().textContent({ timeout: 2_000 })) || '';
    return /^Hello from Node v\d+/.test(h1) ? h1 : null;
  }, 1000);
  const src = await page.locator('#preview').getAttribute('src');
  const plain = /^https?:\/\/user-[a-z0-9]+\.preview\.localhost:\d+\/$/;
  const link = /^https?:\/\/user-[a-z0-9]+\.preview\.localhost:\d+\/\?sandboxd_token=[\w.-]+$/;
  if (!(ownerPreview ? link : plain).test(src || '')) {
    throw new Error(`unexpected preview URL in the iframe: ${src}`);
  }
  const inFrame = page.frames().find((f) => f !== page.mainFrame()).url();
  if (expectPreviewUrl && inFrame !== expectPreviewUrl) {
    throw new Error(`the preview frame shows ${inFrame}, expected ${expectPreviewUrl} (the link's token must be gone)`);
  }
  await page.waitForTimeout(1000); // let the page's logo and styles settle for the picture
  log(`preview shows the ${kind} page "${heading}" (${src}; the frame is at ${inFrame})`);
  await screenshot('preview');
  if (vite) await editorStep(heading.trim());
}

let code = 0;
try {
  await run();
  log(`passed; screenshots in ${artifacts}`);
} catch (e) {
  code = 1;
  console.error(`console.mjs: FAILED: ${e.stack || e}`);
  try {
    await screenshot('failure');
    writeFileSync(join(artifacts, 'failure-page.txt'), await page.locator('body').innerText());
    // CI keeps only the output: what the preview frame showed and the browser's last words.
    const frame = page.frames().find((f) => f !== page.mainFrame());
    if (frame) {
      const shown = await frame.locator('body').innerText({ timeout: 2_000 }).catch((e3) => `(unreadable: ${e3.message})`);
      console.error(`console.mjs: the preview frame is at ${frame.url()} and shows: ${shown.slice(0, 600)}`);
    }
    console.error(`console.mjs: the browser log's last lines:\n${browserLogTail(25).join('\n')}`);
  } catch (e2) {
    console.error(`(no failure screenshot: ${e2.message})`);
  }
}
await context.close().catch(() => {});
rmSync(profile, { recursive: true, force: true });
process.exit(code);
