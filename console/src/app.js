// The sandboxd web console: plain ES modules, no framework. Talks to the API on this origin with
// the pasted bearer token (sessionStorage only) and to the terminal and file-watch WebSockets
// with the token in the `bearer.<token>` subprotocol, so the token never appears in a URL. The
// file tree and editor live in files.js.
import { Terminal } from './xterm.mjs';
import { FitAddon } from './addon-fit.mjs';
import { initFiles } from './files.js';

const TOKEN_KEY = 'sandboxd.token';
const JOB_POLL_MS = 1000;
const JOB_MAX_MS = 15 * 60 * 1000;
const LOG_LINES = 40;
const IDEMPOTENT_POSTS = new Set(['/sandbox/init', '/sandbox/exit']);

const $ = (id) => document.getElementById(id);
const enc = new TextEncoder();

// ---------------------------------------------------------------------------------------------
// API

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

/** Calls the API; resolves with the parsed JSON, rejects with an ApiError that has words. */
async function api(method, path, body) {
  const headers = {};
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  const resp = await fetchRaw(method, path, { headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const text = await resp.text();
  try {
    return text ? JSON.parse(text) : null;
  } catch {
    throw new ApiError(resp.status, 'bad_response', `sandboxd answered ${method} ${path} with something that is not JSON`);
  }
}

/**
 * Calls the API and resolves with the Response when it is a success (2xx; the body is not read
 * yet), rejects with an ApiError that has words otherwise. For file contents (files API).
 */
async function fetchRaw(method, path, { headers: extra = {}, body } = {}) {
  const headers = { ...extra, Authorization: `Bearer ${token()}` };
  const init = { method, headers, cache: 'no-store', credentials: 'omit' };
  if (body !== undefined) init.body = body;
  // Requests that are safe to repeat are retried after a network failure: Chromium aborts
  // requests in flight with ERR_NETWORK_CHANGED whenever Docker adds an interface on the host.
  const retries = method === 'GET' || IDEMPOTENT_POSTS.has(path) ? 2 : 0;
  let resp;
  for (let attempt = 0; ; attempt += 1) {
    try {
      resp = await fetch(path, init);
      break;
    } catch (e) {
      if (attempt >= retries) {
        throw new ApiError(0, 'network', `could not reach sandboxd (${e.message})`);
      }
      await new Promise((r) => setTimeout(r, 400 * (attempt + 1)));
    }
  }
  if (resp.ok) return resp;
  const text = await resp.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    // Not JSON: keep the text for the message below.
  }
  const err = data && data.error;
  const message = err && err.message ? err.message : (text.slice(0, 200) || resp.statusText);
  const e = new ApiError(resp.status, err && err.code ? err.code : 'http_error', message);
  if (resp.status === 401) signOut(`The token was refused: ${message}`);
  throw e;
}

function describe(e) {
  if (e instanceof ApiError) {
    return e.status ? `${e.message} (${e.code}, HTTP ${e.status})` : e.message;
  }
  return String(e && e.message ? e.message : e);
}

function say(msg) {
  $('status').textContent = msg;
}

function showError(id, e) {
  const text = e ? describe(e) : '';
  $(id).textContent = text;
  if (text) say(`Error: ${text}`);
}

/** Runs `fn` with `buttons` disabled; errors land in `errorId`. */
async function busy(buttons, errorId, fn) {
  for (const b of buttons) b.disabled = true;
  showError(errorId, null);
  try {
    return await fn();
  } catch (e) {
    showError(errorId, e);
    return undefined;
  } finally {
    for (const b of buttons) b.disabled = false;
  }
}

// ---------------------------------------------------------------------------------------------
// Sign-in

function token() {
  return sessionStorage.getItem(TOKEN_KEY) || '';
}

/** The `sub` of a JWT, for display only (the server checks the token). */
function userOf(t) {
  try {
    const part = t.split('.')[1].replace(/-/g, '+').replace(/_/g, '/');
    return JSON.parse(atob(part.padEnd(part.length + ((4 - (part.length % 4)) % 4), '='))).sub || '?';
  } catch {
    return '?';
  }
}

function signOut(reason) {
  sessionStorage.removeItem(TOKEN_KEY);
  disconnectTerminal();
  files.reset();
  stopJobPolling();
  setPreview(null);
  previewLink = null;
  $('app-view').hidden = true;
  $('who').hidden = true;
  $('signin-view').hidden = false;
  $('signin-error').textContent = reason || '';
  say(reason ? reason : 'Signed out.');
  $('token').value = '';
  $('token').focus();
}

async function signIn(t) {
  sessionStorage.setItem(TOKEN_KEY, t);
  let status = null;
  try {
    status = await api('GET', '/sandbox/status');
  } catch (e) {
    if (e.code !== 'sandbox_not_found') {
      sessionStorage.removeItem(TOKEN_KEY);
      throw e;
    }
  }
  $('signin-view').hidden = true;
  $('app-view').hidden = false;
  $('who').hidden = false;
  $('who-user').textContent = userOf(t);
  openTerminal();
  renderStatus(status);
  if (status && status.state === 'running') {
    setPreview(status.previewUrl);
    say('Signed in. Your sandbox is running.');
    connectTerminal();
    files.start();
  } else {
    say(status ? `Signed in. Your sandbox is ${status.state}.` : 'Signed in. You have no sandbox yet: start one.');
  }
  $('btn-start').focus();
}

// ---------------------------------------------------------------------------------------------
// Sandbox panel

function when(iso) {
  if (!iso) return '—';
  const d = new Date(iso);
  const s = Math.round((Date.now() - d.getTime()) / 1000);
  const ago = s < 5 ? 'just now' : s < 120 ? `${s} s ago` : s < 7200 ? `${Math.round(s / 60)} min ago` : `${Math.round(s / 3600)} h ago`;
  return `${d.toLocaleString()} (${ago})`;
}

function mib(bytes) {
  return `${Math.round(bytes / 1048576)} MiB`;
}

let lastState = 'none';

function renderStatus(s) {
  const state = s ? s.state : 'none';
  const badge = $('sb-state');
  badge.textContent = state;
  badge.dataset.state = state;
  $('sb-container').textContent = s && s.containerId ? s.containerId.slice(0, 12) : '—';
  $('sb-limits').textContent = s && s.limits
    ? `${mib(s.limits.memoryBytes)} memory, ${s.limits.cpus} CPU, ${s.limits.pids} processes`
    : '—';
  $('sb-created').textContent = s && s.createdAt ? when(s.createdAt) : '—';
  $('sb-activity').textContent = s && s.lastActivity ? when(s.lastActivity) : '—';
  const link = $('sb-preview');
  if (s && s.previewAccess) previewAccess = s.previewAccess;
  if (s && s.previewUrl) {
    if (previewAccess !== 'owner') link.href = s.previewUrl;
    else if (previewLink && previewLink.for === s.previewUrl) link.href = previewLink.url;
    link.textContent = s.previewUrl;
    link.hidden = false;
    $('sb-preview-none').hidden = true;
  } else {
    link.hidden = true;
    $('sb-preview-none').hidden = false;
  }
  $('btn-stop').disabled = !s || state === 'stopped' || state === 'removed';
  lastState = state;
}

async function refresh() {
  try {
    const s = await api('GET', '/sandbox/status');
    renderStatus(s);
    return s;
  } catch (e) {
    if (e.code === 'sandbox_not_found') {
      renderStatus(null);
      return null;
    }
    throw e;
  }
}

async function start() {
  say('Starting the sandbox…');
  const wasRunning = lastState === 'running';
  const r = await api('POST', '/sandbox/init', {});
  const s = await refresh();
  say(`Sandbox ${s ? s.state : r.state}.`);
  if (!ws) connectTerminal();
  files.start();
  // A container that just started adds a network interface on the host, and Chromium aborts
  // requests in flight when it notices (ERR_NETWORK_CHANGED, a second or two later; only when
  // the browser runs on the sandboxd machine): load the preview once that has likely passed.
  // The Reload button is there for the rest.
  if (wasRunning) setPreview(r.previewUrl);
  else setTimeout(() => { if (lastState === 'running') setPreview(r.previewUrl); }, 2500);
}

async function stop() {
  say('Stopping the sandbox…');
  disconnectTerminal();
  files.stop();
  const r = await api('POST', '/sandbox/exit', {});
  setPreview(null);
  renderStatus(null);
  $('sb-state').textContent = r.state;
  $('sb-state').dataset.state = r.state;
  say(r.removed ? 'Sandbox stopped and removed; the workspace stays.' : 'There was no sandbox to stop.');
}

// ---------------------------------------------------------------------------------------------
// Preview

let previewUrl = null;
// `public` or `owner` (from the sandbox's status). An owner-only preview opens through a signed
// link (`POST /sandbox/preview-link`), which sets the preview's cookie and redirects to the
// page; the frame and the "open" links use one. A link is kept for 11 of its 12 hours.
let previewAccess = 'public';
let previewLink = null;
let previewSeq = 0;
const LINK_REUSE_MS = 11 * 3600 * 1000;

async function openableUrl(url) {
  if (previewAccess !== 'owner') return url;
  if (previewLink && previewLink.for === url && Date.now() - previewLink.at < LINK_REUSE_MS) {
    return previewLink.url;
  }
  const r = await api('POST', '/sandbox/preview-link', {});
  previewLink = { for: url, url: r.url, at: Date.now() };
  return r.url;
}

function setPreview(url, reload = false) {
  const frame = $('preview');
  const open = $('preview-open');
  const seq = ++previewSeq;
  if (!url) {
    previewUrl = null;
    frame.hidden = true;
    frame.removeAttribute('src');
    open.hidden = true;
    $('preview-empty').hidden = false;
    return;
  }
  open.hidden = false;
  frame.hidden = false;
  $('preview-empty').hidden = true;
  if (url === previewUrl && !reload) return;
  previewUrl = url;
  openableUrl(url).then(
    (u) => {
      if (seq !== previewSeq) return;
      open.href = u;
      $('sb-preview').href = u;
      frame.src = u;
    },
    (e) => showError('sandbox-error', e),
  );
}

// ---------------------------------------------------------------------------------------------
// Terminal

const term = new Terminal({
  cursorBlink: true,
  fontSize: 14,
  fontFamily: 'ui-monospace, "DejaVu Sans Mono", Menlo, Consolas, monospace',
  scrollback: 5000,
  theme: { background: '#111827', foreground: '#e5e7eb', cursor: '#34d399' },
});
const fit = new FitAddon();
term.loadAddon(fit);
let ws = null;
let wanted = false;
let termOpened = false;

/** Opens xterm.js in its element once that is visible (it measures the font when opening). */
function openTerminal() {
  if (termOpened) return;
  termOpened = true;
  term.open($('terminal'));
  fit.fit();
}

function termState(text) {
  $('term-state').textContent = text;
  $('term-state').dataset.state = text;
  $('btn-term').textContent = ws ? 'Disconnect' : 'Connect';
}

function send(data) {
  if (ws && ws.readyState === WebSocket.OPEN) ws.send(data);
}

function connectTerminal() {
  if (ws) return;
  wanted = true;
  openTerminal();
  fit.fit();
  const scheme = location.protocol === 'https:' ? 'wss:' : 'ws:';
  const url = `${scheme}//${location.host}/sandbox/terminal?cols=${term.cols}&rows=${term.rows}`;
  let opened = false;
  const sock = new WebSocket(url, [`bearer.${token()}`]);
  sock.binaryType = 'arraybuffer';
  ws = sock;
  termState('connecting');
  sock.onopen = () => {
    opened = true;
    termState('open');
    say('Terminal connected.');
    send(JSON.stringify({ type: 'resize', cols: term.cols, rows: term.rows }));
    term.focus();
  };
  sock.onmessage = (ev) => {
    if (typeof ev.data !== 'string') {
      term.write(new Uint8Array(ev.data));
      return;
    }
    let msg;
    try {
      msg = JSON.parse(ev.data);
    } catch {
      return;
    }
    if (msg.type === 'error') say(`Terminal: ${msg.message || msg.code}`);
  };
  sock.onclose = (ev) => {
    if (ws === sock) ws = null;
    termState('closed');
    let why;
    if (ev.reason && ev.reason.startsWith('exit')) {
      why = `the shell ended (${ev.reason})`;
    } else if (!opened) {
      why = `the terminal could not be opened (code ${ev.code}): check that the token is valid and the sandbox can start`;
    } else {
      why = `the connection closed (code ${ev.code}${ev.reason ? `: ${ev.reason}` : ''})`;
    }
    if (wanted) {
      term.write(`\r\n\x1b[33m[${why}; press Connect to open a new shell]\x1b[0m\r\n`);
      say(`Terminal: ${why}.`);
    }
    wanted = false;
  };
}

function disconnectTerminal() {
  wanted = false;
  if (ws) {
    const s = ws;
    ws = null;
    s.close(1000, 'closed by the console');
  }
  termState('closed');
}

term.onData((d) => send(enc.encode(d)));
term.onBinary((d) => send(Uint8Array.from(d, (c) => c.charCodeAt(0) & 0xff)));
term.onResize(({ cols, rows }) => send(JSON.stringify({ type: 'resize', cols, rows })));
// The terminal takes Tab; F6 / Shift+F6 move the focus out of it (keyboard users).
term.attachCustomKeyEventHandler((ev) => {
  if (ev.type === 'keydown' && ev.key === 'F6') {
    ev.preventDefault();
    (ev.shiftKey ? $('btn-term') : $('btn-reload')).focus();
    return false;
  }
  return true;
});

let fitQueued = false;
function queueFit() {
  if (fitQueued) return;
  fitQueued = true;
  requestAnimationFrame(() => {
    fitQueued = false;
    if (termOpened && !$('app-view').hidden) fit.fit();
  });
}

// ---------------------------------------------------------------------------------------------
// Projects

let jobTimer = null;

function stopJobPolling() {
  if (jobTimer) clearTimeout(jobTimer);
  jobTimer = null;
}

/** Last lines of a log, without ANSI escapes, with carriage-return redraws collapsed. */
function tail(log) {
  const clean = (log || '')
    .replace(/\x1b\[[0-9;?]*[ -/]*[@-~]/g, '')
    .replace(/\x1b[()][0-9A-Za-z]/g, '')
    .split('\n')
    .map((l) => l.split('\r').filter((p) => p.length).pop() || '')
    .filter((l, i, all) => l.trim() || i < all.length - 1);
  return clean.slice(-LOG_LINES).join('\n');
}

function renderJob(j) {
  $('job').hidden = false;
  $('job-title').textContent = `${j.template} project “${j.project}”`;
  $('job-step').textContent = j.step;
  $('job-state').textContent = j.status;
  $('job-state').dataset.state = j.status;
  const p = $('job-progress');
  if (j.status === 'running') {
    p.removeAttribute('value');
  } else {
    p.max = 1;
    p.value = j.status === 'succeeded' ? 1 : 0;
  }
  const log = $('job-log');
  const atEnd = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
  log.textContent = tail(j.log) + (j.error ? `\n${j.error}` : '');
  if (atEnd) log.scrollTop = log.scrollHeight;
}

async function createProject(template) {
  const name = $('project-name').value.trim();
  if (!/^[a-z0-9][a-z0-9_-]{0,63}$/.test(name)) {
    throw new ApiError(0, 'invalid_name', 'The folder name must be 1–64 of a–z, 0–9, - and _, starting with a letter or digit.');
  }
  stopJobPolling();
  say(`Creating the ${template} project “${name}”…`);
  const job = await api('POST', '/sandbox/projects', { template, name });
  renderJob(job);
  refresh().catch(() => {});
  return pollJob(job.id, Date.now());
}

function pollJob(id, started) {
  const buttons = [$('btn-node'), $('btn-vite')];
  for (const b of buttons) b.disabled = true;
  return new Promise((resolve) => {
    const done = (msg) => {
      stopJobPolling();
      for (const b of buttons) b.disabled = false;
      if (msg) say(msg);
      resolve();
    };
    const tick = async () => {
      let j;
      try {
        j = await api('GET', `/sandbox/jobs/${encodeURIComponent(id)}`);
      } catch (e) {
        showError('projects-error', e);
        if (e.status === 0 && Date.now() - started < JOB_MAX_MS) {
          jobTimer = setTimeout(tick, JOB_POLL_MS * 3);
          return;
        }
        done();
        return;
      }
      renderJob(j);
      if (j.status === 'running') {
        if (Date.now() - started > JOB_MAX_MS) {
          done('Stopped watching the project job: it runs longer than 15 minutes.');
          return;
        }
        say(`Project “${j.project}”: ${j.step}…`);
        jobTimer = setTimeout(tick, JOB_POLL_MS);
      } else if (j.status === 'succeeded') {
        setPreview(j.previewUrl, true);
        done(`Project “${j.project}” is ready; the preview shows it.`);
      } else {
        $('projects-error').textContent = `The project job failed: ${j.error || 'no reason given'}`;
        done(`Project “${j.project}” failed: ${j.error || 'no reason given'}.`);
      }
    };
    jobTimer = setTimeout(tick, 300);
  });
}

// ---------------------------------------------------------------------------------------------
// Run code

// Sample code per language, shown when the picker changes and the box holds another sample.
const SAMPLES = {
  javascript: "console.log('hello from', process.version);\nconsole.error('a line on stderr');",
  typescript: "const greet = (who: string): string => `hello, ${who}`;\nconsole.log(greet('TypeScript'));",
  python: "import sys\nprint('hello from Python', sys.version.split()[0])\nprint('a line on stderr', file=sys.stderr)",
  bash: 'echo "hello from $(bash --version | head -1)"\nls /workspace',
};

function pickLanguage() {
  const lang = $('language').value;
  const box = $('code');
  if (Object.values(SAMPLES).includes(box.value.trim()) || !box.value.trim()) box.value = SAMPLES[lang];
  $('code-label').textContent = `${$('language').selectedOptions[0].textContent} code (Ctrl+Enter runs it)`;
}

async function runCode() {
  const code = $('code').value;
  const body = { code };
  // JavaScript is the server's default: it is left out, so the request is the one of before.
  const language = $('language').value;
  if (language !== 'javascript') body.language = language;
  const t = Number($('timeout').value);
  if ($('timeout').value !== '' && Number.isInteger(t)) body.timeoutMs = t;
  say('Running the code…');
  const r = await api('POST', '/sandbox/execute', body);
  const flags = [
    r.timedOut ? 'timed out' : '',
    r.truncated ? 'output truncated' : '',
    r.oomKilled ? 'killed: out of memory' : '',
  ].filter(Boolean);
  $('run-summary').textContent = `exit code ${r.exitCode === null ? '— (killed)' : r.exitCode} · ${r.durationMs} ms${flags.length ? ` · ${flags.join(' · ')}` : ''}`;
  $('run-summary').dataset.ok = String(r.exitCode === 0);
  $('run-stdout').textContent = r.output || '';
  $('run-stderr').textContent = r.error || '';
  say(`Code ran: exit code ${r.exitCode}, ${r.durationMs} ms.`);
  refresh().catch(() => {});
}

// ---------------------------------------------------------------------------------------------
// Wiring

function wire() {
  $('signin-form').addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const t = $('token').value.trim().replace(/^Bearer\s+/i, '');
    if (!/^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*$/.test(t)) {
      $('signin-error').textContent = 'That does not look like a token (three dot-separated parts).';
      return;
    }
    await busy([$('signin-submit')], 'signin-error', () => signIn(t));
  });
  $('signout').addEventListener('click', () => signOut());
  $('btn-start').addEventListener('click', () => busy([$('btn-start')], 'sandbox-error', start));
  $('btn-refresh').addEventListener('click', () => busy([$('btn-refresh')], 'sandbox-error', async () => {
    const s = await refresh();
    if (s && s.state === 'running') {
      setPreview(s.previewUrl);
      files.start();
    }
    say(s ? `Sandbox ${s.state}.` : 'You have no sandbox yet.');
  }));
  $('btn-stop').addEventListener('click', () => busy([$('btn-stop')], 'sandbox-error', stop));
  $('btn-term').addEventListener('click', () => (ws ? disconnectTerminal() : connectTerminal()));
  $('btn-reload').addEventListener('click', () => {
    if (previewUrl) setPreview(previewUrl, true);
  });
  for (const b of [$('btn-node'), $('btn-vite')]) {
    b.addEventListener('click', () => busy([], 'projects-error', () => createProject(b.dataset.template)));
  }
  $('run-form').addEventListener('submit', (ev) => {
    ev.preventDefault();
    busy([$('btn-run')], 'run-error', runCode);
  });
  $('language').addEventListener('change', pickLanguage);
  $('code').addEventListener('keydown', (ev) => {
    if (ev.key === 'Enter' && (ev.ctrlKey || ev.metaKey)) {
      ev.preventDefault();
      $('run-form').requestSubmit();
    }
  });
  new ResizeObserver(queueFit).observe($('terminal'));
  window.addEventListener('resize', queueFit);
}

const files = initFiles({
  api,
  fetchRaw,
  token,
  say,
  describe,
  sandboxState: async () => {
    const s = await refresh();
    return s ? s.state : null;
  },
});

function main() {
  wire();
  termState('closed');
  const t = token();
  if (t) {
    busy([], 'signin-error', () => signIn(t)).then(() => {
      if ($('app-view').hidden) {
        $('signin-view').hidden = false;
        say('Sign in with a token.');
      }
    });
  } else {
    $('signin-view').hidden = false;
    say('Sign in with a token.');
    $('token').focus();
  }
}

main();
