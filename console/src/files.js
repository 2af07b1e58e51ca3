// The console's file tree and editor over the files API (`/sandbox/files…`, paths relative to
// /workspace): folders load when opened, files open in the CodeMirror editor (dist/editor.js,
// the one bundled module), Save / Ctrl+S writes them back, and the tree follows changes made
// elsewhere (the terminal, code runs) through the watch WebSocket, which authenticates with the
// `bearer.<token>` subprotocol as the terminal does and reconnects after drops.
import { createEditor, languageFor } from './editor.js';

/** Files larger than this, and binary ones, open read-only with a notice. */
const EDIT_MAX_BYTES = 2 * 1024 * 1024;
/** How much of a file over EDIT_MAX_BYTES is shown. */
const PEEK_BYTES = 64 * 1024;
const WATCH_BACKOFF_MS = [1000, 2000, 4000, 8000, 15000];
const REFRESH_DEBOUNCE_MS = 200;

const $ = (id) => document.getElementById(id);

const parentOf = (p) => (p.includes('/') ? p.slice(0, p.lastIndexOf('/')) : '');
const baseName = (p) => p.slice(p.lastIndexOf('/') + 1);
const join = (dir, name) => (dir ? `${dir}/${name}` : name);
const inside = (p, dir) => p === dir || p.startsWith(`${dir}/`);
const q = (p) => `path=${encodeURIComponent(p)}`;

function size(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1048576) return `${(n / 1024).toFixed(1)} KiB`;
  return `${(n / 1048576).toFixed(1)} MiB`;
}

/**
 * Wires the files panel. `deps`: `api(method, path, body)` (JSON), `fetchRaw(method, path,
 * {body, headers})` (a Response, errors thrown as by api), `token()`, `say(msg)`,
 * `describe(error)`, `sandboxState()` (resolves with the state, or null without a sandbox).
 */
export function initFiles(deps) {
  const { api, fetchRaw, token, say, describe } = deps;

  // path -> { path, name, type, size, loaded, expanded, children: [path], truncated }
  const nodes = new Map();
  let selected = null; // the selected tree item's path ('' = the root)
  let active = false; // the sandbox runs and the tree is shown
  let open = null; // { path, editable, saved (text on disk), deleted }
  let dirty = false;
  let saving = false;
  let nameAction = null; // what the name form does on submit

  const editor = createEditor($('editor'), {
    onChange: () => queueDirtyCheck(),
    onSave: () => save(),
    label: 'file editor',
  });

  function error(e) {
    const text = e ? describe(e) : '';
    $('files-error').textContent = text;
    if (text) say(`Files: ${text}`);
  }

  async function guard(fn) {
    error(null);
    try {
      return await fn();
    } catch (e) {
      error(e);
      return undefined;
    }
  }

  // -------------------------------------------------------------------------------------------
  // Tree

  function rootNode() {
    if (!nodes.has('')) {
      nodes.set('', { path: '', name: 'workspace', type: 'dir', loaded: false, expanded: true, children: [] });
    }
    return nodes.get('');
  }

  /** Lists a folder again and merges the answer into the tree (keeping what is expanded). */
  async function load(path) {
    const node = path === '' ? rootNode() : nodes.get(path);
    if (!node) return;
    let r;
    try {
      r = await api('GET', `/sandbox/files?${q(path)}`);
    } catch (e) {
      if (e.code === 'file_not_found' || e.code === 'not_a_directory') {
        forget(path);
        render();
        return;
      }
      throw e;
    }
    const entries = (r.entries || []).slice().sort((a, b) =>
      (a.type === 'dir') === (b.type === 'dir') ? a.name.localeCompare(b.name) : a.type === 'dir' ? -1 : 1);
    const keep = new Set();
    for (const e of entries) {
      const p = join(path, e.name);
      keep.add(p);
      const old = nodes.get(p);
      const type = e.type === 'symlink' && e.target !== undefined ? 'symlink' : e.type;
      if (old && old.type === type) {
        old.size = e.size;
        old.modified = e.modified;
      } else {
        if (old) forget(p);
        nodes.set(p, { path: p, name: e.name, type, size: e.size, modified: e.modified, loaded: false, expanded: false, children: [] });
      }
    }
    for (const c of node.children) if (!keep.has(c)) forget(c);
    node.children = entries.map((e) => join(path, e.name));
    node.truncated = !!r.truncated;
    node.loaded = true;
    render();
  }

  function forget(path) {
    const node = nodes.get(path);
    if (!node) return;
    for (const c of node.children) forget(c);
    nodes.delete(path);
    if (selected !== null && inside(selected, path)) selected = null;
  }

  function render() {
    const tree = $('tree');
    const focused = document.activeElement && tree.contains(document.activeElement)
      ? document.activeElement.dataset.path : null;
    const root = rootNode();
    const list = document.createElement('ul');
    list.setAttribute('role', 'group');
    renderChildren(root, list, 0);
    const head = document.createElement('button');
    head.type = 'button';
    head.className = 'tree-item root';
    head.dataset.path = '';
    head.textContent = '/workspace';
    head.setAttribute('aria-current', selected === '' ? 'true' : 'false');
    tree.replaceChildren(head, list);
    if (root.loaded && root.children.length === 0) {
      const p = document.createElement('p');
      p.className = 'hint tree-empty';
      p.textContent = 'The workspace is empty: create a file or a project.';
      tree.append(p);
    }
    if (focused !== null && focused !== undefined) {
      const again = tree.querySelector(`[data-path="${CSS.escape(focused)}"]`);
      if (again) again.focus();
    }
    updateButtons();
  }

  function renderChildren(node, list, depth) {
    for (const p of node.children) {
      const child = nodes.get(p);
      if (!child) continue;
      const li = document.createElement('li');
      const b = document.createElement('button');
      b.type = 'button';
      b.className = `tree-item ${child.type}`;
      b.dataset.path = p;
      b.style.paddingLeft = `${0.4 + depth * 0.9}rem`;
      const isDir = child.type === 'dir';
      if (isDir) b.setAttribute('aria-expanded', String(child.expanded));
      b.setAttribute('aria-current', selected === p ? 'true' : 'false');
      const icon = document.createElement('span');
      icon.className = 'icon';
      icon.setAttribute('aria-hidden', 'true');
      icon.textContent = isDir ? (child.expanded ? '▾' : '▸') : child.type === 'symlink' ? '↪' : '·';
      const name = document.createElement('span');
      name.className = 'name';
      name.textContent = child.name;
      b.append(icon, name);
      if (open && open.path === p) {
        b.classList.add('open');
        if (dirty) {
          const mark = document.createElement('span');
          mark.className = 'dirty';
          mark.textContent = ' ●';
          mark.title = 'unsaved changes';
          b.append(mark);
        }
      }
      b.title = isDir ? p : `${p} (${size(child.size || 0)})`;
      li.append(b);
      if (isDir && child.expanded) {
        const sub = document.createElement('ul');
        sub.setAttribute('role', 'group');
        if (!child.loaded) {
          const wait = document.createElement('li');
          wait.className = 'hint';
          wait.style.paddingLeft = `${1.3 + depth * 0.9}rem`;
          wait.textContent = 'loading…';
          sub.append(wait);
        }
        renderChildren(child, sub, depth + 1);
        if (child.truncated) {
          const more = document.createElement('li');
          more.className = 'hint';
          more.textContent = '(more entries not shown)';
          sub.append(more);
        }
        li.append(sub);
      }
      list.append(li);
    }
  }

  async function toggle(path) {
    const node = nodes.get(path);
    if (!node || node.type !== 'dir') return;
    node.expanded = !node.expanded;
    render();
    if (node.expanded && !node.loaded) await load(path);
  }

  /** The folder that new files go into: the selected folder, or the selected file's folder. */
  function targetFolder() {
    if (selected === null) return '';
    const n = nodes.get(selected);
    if (selected === '' || (n && n.type === 'dir')) return selected;
    return parentOf(selected);
  }

  /** Opens the folders down to `path`'s parent, loading them. */
  async function reveal(path) {
    let dir = '';
    for (const part of parentOf(path).split('/').filter(Boolean)) {
      dir = join(dir, part);
      const n = nodes.get(dir);
      if (!n) break;
      n.expanded = true;
      if (!n.loaded) await load(dir);
    }
    render();
  }

  // -------------------------------------------------------------------------------------------
  // Editor

  let dirtyQueued = false;
  function queueDirtyCheck() {
    if (dirtyQueued) return;
    dirtyQueued = true;
    requestAnimationFrame(() => {
      dirtyQueued = false;
      setDirty(!!open && open.editable && editor.text() !== open.saved);
    });
  }

  function setDirty(d) {
    const was = dirty;
    dirty = d;
    $('editor-dirty').hidden = !d;
    if (was !== d) render();
    updateButtons();
  }

  function notice(text) {
    $('editor-notice').textContent = text || '';
  }

  function showFile(path, text, editable, why) {
    open = { path, editable, saved: text };
    $('editor-none').hidden = true;
    $('editor').hidden = false;
    const label = editor.open(path, text, { readOnly: !editable });
    $('editor-file').textContent = path;
    $('editor-lang').textContent = label;
    $('editor-lang').hidden = false;
    notice(why);
    setDirty(false);
    render();
  }

  function closeFile() {
    open = null;
    editor.open('', '', { readOnly: true });
    $('editor').hidden = true;
    $('editor-none').hidden = false;
    $('editor-file').textContent = 'No file open';
    $('editor-lang').hidden = true;
    notice('');
    setDirty(false);
  }

  async function read(path, knownSize) {
    if (knownSize > EDIT_MAX_BYTES) {
      const r = await fetchRaw('GET', `/sandbox/files?${q(path)}`, { headers: { Range: `bytes=0-${PEEK_BYTES - 1}` } });
      const bytes = new Uint8Array(await r.arrayBuffer());
      return { bytes: bytes.subarray(0, PEEK_BYTES), total: knownSize, partial: true };
    }
    const r = await fetchRaw('GET', `/sandbox/files?${q(path)}`);
    const bytes = new Uint8Array(await r.arrayBuffer());
    return { bytes, total: bytes.length, partial: false };
  }

  function decode(bytes) {
    if (bytes.subarray(0, 8000).includes(0)) return null;
    try {
      return new TextDecoder('utf-8', { fatal: true }).decode(bytes);
    } catch {
      return null;
    }
  }

  async function openFile(path) {
    if (open && open.path === path) {
      editor.focus();
      return;
    }
    if (dirty && !window.confirm(`Discard the unsaved changes to ${open.path}?`)) return;
    const node = nodes.get(path);
    say(`Opening ${path}…`);
    const { bytes, total, partial } = await read(path, node ? node.size || 0 : 0);
    const text = decode(bytes);
    if (partial || total > EDIT_MAX_BYTES) {
      const shown = text === null ? '' : text;
      showFile(path, shown, false, `${path} is ${size(total)}, more than ${size(EDIT_MAX_BYTES)}: shown read-only${text === null ? ' (binary, not shown)' : `, first ${size(Math.min(total, PEEK_BYTES))} only`}.`);
    } else if (text === null) {
      showFile(path, '', false, `${path} is a binary file (${size(total)}): it opens read-only and is not shown.`);
    } else {
      showFile(path, text, true, '');
      editor.focus();
    }
    say(`Opened ${path}${open.editable ? '' : ' (read-only)'}.`);
  }

  async function save() {
    if (!open || !open.editable || saving) return;
    const { path } = open;
    const text = editor.text();
    saving = true;
    updateButtons();
    say(`Saving ${path}…`);
    try {
      await guard(async () => {
        await fetchRaw('PUT', `/sandbox/files?${q(path)}`, {
          body: new TextEncoder().encode(text),
          headers: { 'Content-Type': 'application/octet-stream' },
        });
        if (open && open.path === path) {
          open.saved = text;
          open.deleted = false;
          notice('');
          setDirty(editor.text() !== text);
        }
        say(`Saved ${path}.`);
        await load(parentOf(path)).catch(() => {});
      });
    } finally {
      saving = false;
      updateButtons();
    }
  }

  /** The open file changed on disk: take the new text when there are no unsaved edits. */
  async function reloadOpen() {
    if (!open) return;
    const { path } = open;
    let r;
    try {
      r = await api('GET', `/sandbox/files/stat?${q(path)}`);
    } catch (e) {
      if (e.code === 'file_not_found' && open && open.path === path) {
        open.deleted = true;
        notice(`${path} was deleted on disk${open.editable ? ': Save writes it again' : ''}.`);
      }
      return;
    }
    if (!open || open.path !== path || !open.editable || r.entry.size > EDIT_MAX_BYTES) return;
    const { bytes } = await read(path, r.entry.size);
    const text = decode(bytes);
    if (!open || open.path !== path || text === null || text === open.saved) return;
    if (dirty) {
      notice(`${path} changed on disk since it was opened: Save overwrites that change.`);
      return;
    }
    open.saved = text;
    editor.replace(text);
    setDirty(false);
    notice(`${path} changed on disk and was reloaded.`);
  }

  function updateButtons() {
    const on = active;
    $('btn-save').disabled = !on || !open || !open.editable || saving || (!dirty && !open.deleted);
    $('btn-new-file').disabled = !on;
    $('btn-new-folder').disabled = !on;
    const real = on && selected !== null && selected !== '' && nodes.has(selected);
    $('btn-rename').disabled = !real;
    $('btn-delete').disabled = !real;
  }

  // -------------------------------------------------------------------------------------------
  // New file, new folder, rename, delete

  function askName(title, value, action) {
    nameAction = action;
    $('name-label').textContent = title;
    $('name-form').hidden = false;
    const input = $('name-input');
    input.value = value;
    input.focus();
    const dot = value.lastIndexOf('.');
    const slash = value.lastIndexOf('/');
    input.setSelectionRange(slash + 1, dot > slash + 1 ? dot : value.length);
  }

  function closeNameForm() {
    nameAction = null;
    $('name-form').hidden = true;
  }

  function checkPath(p) {
    const parts = p.split('/');
    if (!p || p.startsWith('/') || parts.some((s) => s === '' || s === '.' || s === '..')) {
      throw Object.assign(new Error(`“${p}” is not a path inside /workspace (no leading /, no empty, . or .. parts)`), { code: 'invalid_path' });
    }
    return p;
  }

  function newFile() {
    const dir = targetFolder();
    askName(`New file in /workspace${dir ? `/${dir}` : ''}`, '', async (name) => {
      const path = checkPath(join(dir, name));
      // An existing file is not overwritten: the folder's fresh listing tells, or a stat for a
      // name in a subfolder.
      await load(dir);
      const exists = nodes.has(path) || (name.includes('/') && await api('GET', `/sandbox/files/stat?${q(path)}`).then(() => true, (e) => {
        if (e.code === 'file_not_found') return false;
        throw e;
      }));
      if (exists) throw Object.assign(new Error(`${path} already exists`), { code: 'file_exists' });
      await fetchRaw('PUT', `/sandbox/files?${q(path)}`, { body: new Uint8Array(0), headers: { 'Content-Type': 'application/octet-stream' } });
      await load(dir);
      await reveal(path);
      selected = path;
      say(`Created ${path}.`);
      closeNameForm();
      await openFile(path);
    });
  }

  function newFolder() {
    const dir = targetFolder();
    askName(`New folder in /workspace${dir ? `/${dir}` : ''}`, '', async (name) => {
      const path = checkPath(join(dir, name));
      await api('POST', '/sandbox/files/mkdir', { path, parents: name.includes('/') });
      await load(dir);
      await reveal(path);
      selected = path;
      const n = nodes.get(path);
      if (n) {
        n.expanded = true;
        await load(path);
      }
      say(`Created the folder ${path}.`);
    });
  }

  function rename() {
    const from = selected;
    if (!from) return;
    askName(`Rename or move ${from} to`, from, async (to) => {
      checkPath(to);
      if (to === from) return;
      if (open && inside(open.path, from) && dirty) {
        throw Object.assign(new Error(`save or discard the changes to ${open.path} first`), { code: 'unsaved_changes' });
      }
      await api('POST', '/sandbox/files/move', { from, to });
      if (open && inside(open.path, from)) {
        const before = open.path;
        open.path = to + open.path.slice(from.length);
        $('editor-file').textContent = open.path;
        notice('');
        // A new extension may mean another language: show the same text with its highlighting.
        if (languageFor(before).label !== languageFor(open.path).label) {
          $('editor-lang').textContent = editor.open(open.path, editor.text(), { readOnly: !open.editable });
        }
      }
      const wasOpen = nodes.get(from) && nodes.get(from).expanded;
      forget(from);
      selected = to;
      await load(parentOf(from));
      if (parentOf(to) !== parentOf(from)) await load(parentOf(to)).catch(() => {});
      await reveal(to);
      const moved = nodes.get(to);
      if (wasOpen && moved && moved.type === 'dir') {
        moved.expanded = true;
        await load(to);
      }
      say(`Renamed ${from} to ${to}.`);
    });
  }

  async function remove() {
    const path = selected;
    const node = path ? nodes.get(path) : null;
    if (!node) return;
    const isDir = node.type === 'dir';
    if (!window.confirm(`Delete ${path}${isDir ? ' and everything in it' : ''}? This cannot be undone.`)) return;
    await api('DELETE', `/sandbox/files?${q(path)}${isDir ? '&recursive=true' : ''}`);
    if (open && inside(open.path, path)) closeFile();
    forget(path);
    selected = null;
    await load(parentOf(path));
    say(`Deleted ${path}.`);
  }

  // -------------------------------------------------------------------------------------------
  // Following changes: the watch WebSocket

  let sock = null;
  let attempts = 0;
  let retryTimer = null;
  const pending = new Set(); // folders to list again
  let pendingAll = false;
  let pendingOpen = false;
  let flushTimer = null;

  function queueRefresh(dir) {
    pending.add(dir);
    scheduleFlush();
  }

  function scheduleFlush() {
    if (flushTimer) return;
    flushTimer = setTimeout(flush, REFRESH_DEBOUNCE_MS);
  }

  async function flush() {
    flushTimer = null;
    if (!active) return;
    // After an overflow or a reconnect: every folder shown, and the root even if its first
    // listing failed.
    const dirs = pendingAll
      ? ['', ...[...nodes.values()].filter((n) => n.type === 'dir' && n.loaded && n.path !== '').map((n) => n.path)]
      : [...pending];
    const reopen = pendingOpen || pendingAll;
    pending.clear();
    pendingAll = false;
    pendingOpen = false;
    for (const d of dirs) {
      const n = d === '' ? rootNode() : nodes.get(d);
      if (n && (n.loaded || d === '')) await load(d).catch((e) => error(e));
    }
    if (reopen) await reloadOpen().catch(() => {});
  }

  function onEvent(ev) {
    if (ev.type === 'overflow') {
      pendingAll = true;
      scheduleFlush();
      return;
    }
    if (typeof ev.path !== 'string') return;
    if (ev.type !== 'modify' || ev.isDir) queueRefresh(parentOf(ev.path));
    else if (nodes.has(ev.path)) queueRefresh(parentOf(ev.path)); // the size in the tip
    if (open && (open.path === ev.path || (ev.type !== 'modify' && inside(open.path, ev.path)))) {
      pendingOpen = true;
      scheduleFlush();
    }
  }

  function watch() {
    if (sock || !active) return;
    const scheme = location.protocol === 'https:' ? 'wss:' : 'ws:';
    const s = new WebSocket(`${scheme}//${location.host}/sandbox/files/watch?path=&recursive=true`, [`bearer.${token()}`]);
    sock = s;
    watchState('connecting');
    let opened = false;
    s.onopen = () => {
      opened = true;
      const again = attempts > 0;
      attempts = 0;
      watchState('following');
      // Changes made while the socket was down were missed: list everything again.
      if (again) {
        pendingAll = true;
        scheduleFlush();
      }
    };
    s.onmessage = (m) => {
      if (typeof m.data !== 'string') return;
      let ev;
      try {
        ev = JSON.parse(m.data);
      } catch {
        return;
      }
      if (ev && ev.type) onEvent(ev);
    };
    s.onclose = async (ev) => {
      if (sock !== s) return;
      sock = null;
      if (!active) return;
      watchState('reconnecting');
      attempts += 1;
      const delay = WATCH_BACKOFF_MS[Math.min(attempts - 1, WATCH_BACKOFF_MS.length - 1)];
      if (!opened && attempts === 1) say(`Files: the change feed could not be opened (code ${ev.code}); retrying.`);
      retryTimer = setTimeout(async () => {
        retryTimer = null;
        if (!active || sock) return;
        // Do not wake a sandbox that stopped (idle) just to follow its files.
        const state = await deps.sandboxState().catch(() => 'unknown');
        if (state === 'running' || state === 'unknown') watch();
        else stop(`The sandbox is ${state || 'gone'}: start it to browse /workspace.`);
      }, delay);
    };
  }

  function watchState(text) {
    $('watch-state').textContent = text;
    $('watch-state').dataset.state = text === 'following' ? 'open' : text === 'connecting' || text === 'reconnecting' ? 'connecting' : 'closed';
  }

  function unwatch() {
    if (retryTimer) clearTimeout(retryTimer);
    retryTimer = null;
    if (sock) {
      const s = sock;
      sock = null;
      s.close(1000, 'closed by the console');
    }
    watchState('off');
  }

  // -------------------------------------------------------------------------------------------
  // Start and stop with the sandbox

  async function start() {
    if (active) return;
    active = true;
    $('tree-empty').hidden = true;
    $('tree').hidden = false;
    rootNode();
    render();
    watch();
    await guard(() => load(''));
    if (open) await reloadOpen().catch(() => {});
  }

  function stop(why) {
    active = false;
    unwatch();
    nodes.clear();
    selected = null;
    $('tree').hidden = true;
    $('tree').replaceChildren();
    $('tree-empty').textContent = why || 'Start the sandbox to browse /workspace.';
    $('tree-empty').hidden = false;
    closeNameForm();
    updateButtons();
  }

  /** Signing out: forget the open file too. */
  function reset() {
    stop();
    closeFile();
  }

  // -------------------------------------------------------------------------------------------
  // Wiring

  $('tree').addEventListener('click', (ev) => {
    const b = ev.target.closest('.tree-item');
    if (!b) return;
    const path = b.dataset.path;
    selected = path;
    const n = nodes.get(path);
    if (path === '') render();
    else if (n && n.type === 'dir') guard(() => toggle(path));
    else {
      render();
      guard(() => openFile(path));
    }
  });
  $('tree').addEventListener('keydown', (ev) => {
    const b = ev.target.closest('.tree-item');
    if (!b) return;
    const items = [...$('tree').querySelectorAll('.tree-item')];
    const i = items.indexOf(b);
    const n = nodes.get(b.dataset.path);
    if (ev.key === 'ArrowDown' && i < items.length - 1) items[i + 1].focus();
    else if (ev.key === 'ArrowUp' && i > 0) items[i - 1].focus();
    else if (ev.key === 'ArrowRight' && n && n.type === 'dir' && !n.expanded) guard(() => toggle(n.path));
    else if (ev.key === 'ArrowLeft' && n && n.type === 'dir' && n.expanded) guard(() => toggle(n.path));
    else if (ev.key === 'F2' && n) { selected = n.path; render(); rename(); }
    else if (ev.key === 'Delete' && n) { selected = n.path; render(); guard(remove); }
    else return;
    ev.preventDefault();
  });
  $('btn-save').addEventListener('click', () => save());
  $('btn-new-file').addEventListener('click', () => newFile());
  $('btn-new-folder').addEventListener('click', () => newFolder());
  $('btn-rename').addEventListener('click', () => rename());
  $('btn-delete').addEventListener('click', () => guard(remove));
  $('name-form').addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const action = nameAction;
    const value = $('name-input').value.trim();
    if (!action || !value || $('name-input').readOnly) return;
    $('name-input').readOnly = true;
    let ok;
    try {
      ok = await guard(async () => {
        await action(value);
        return true;
      });
    } finally {
      $('name-input').readOnly = false;
    }
    if (ok && nameAction === action) closeNameForm();
  });
  $('name-cancel').addEventListener('click', () => closeNameForm());
  $('name-input').addEventListener('keydown', (ev) => {
    if (ev.key === 'Escape') closeNameForm();
  });
  // Ctrl/Cmd+S anywhere in the files panel saves (the editor handles it itself when focused).
  $('files-panel').addEventListener('keydown', (ev) => {
    if (ev.defaultPrevented || !(ev.ctrlKey || ev.metaKey) || ev.key.toLowerCase() !== 's') return;
    ev.preventDefault();
    save();
  });
  window.addEventListener('beforeunload', (ev) => {
    if (dirty) ev.preventDefault();
  });

  closeFile();
  stop();
  return { start, stop, reset, languageFor, isDirty: () => dirty };
}
