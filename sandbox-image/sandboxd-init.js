#!/usr/bin/env node
// sandboxd-init.js: the management roles of sandboxd-init (installed as
// /usr/local/lib/sandboxd/sandboxd-init.js; /usr/local/bin/sandboxd-init, a bash
// script, boots the container and runs this file for every role below, and for
// discovery whenever its own JSON reader cannot tell). No npm dependencies.
//
//   sandboxd-init                 (with SANDBOXD_INIT_NODE=1 only) start the preview
//                                 dev server, then stay alive; on SIGTERM/SIGINT
//                                 stop the dev server and exit 0 (the bash init
//                                 does this by default)
//   sandboxd-init --start-dev     start the dev server detached unless it runs
//   sandboxd-init --stop-dev      stop the dev server (SIGTERM, SIGKILL after 2 s)
//   sandboxd-init --restart-dev   stop, then start
//   sandboxd-init --status        report whether the dev server runs
//
// Every role prints exactly one JSON line on stdout, e.g.
//   {"started":true,"cwd":"/workspace/my-app","reason":"started","pid":42,...}
//
// Preview app discovery, in order:
//   1. /workspace/.sandboxd/preview.json {"cwd": "my-app", "command": "..."}
//      (cwd relative to /workspace, must stay inside it after resolving symlinks)
//   2. /workspace/package.json with scripts.dev
// Command: $SANDBOXD_DEV_COMMAND, else preview.json "command", else
//   npm run dev -- --host 0.0.0.0 --port 5173
// run as `bash -c <command>` (no login shell) in its own process group, output appended to
// /workspace/.sandboxd/dev.log.
'use strict';

// The agent's key is for the agent only: neither the dev server nor anything else started
// from here gets it.
delete process.env.SANDBOXD_AGENT_KEY;

const fs = require('fs');
const path = require('path');
const { spawn } = require('child_process');

const WORKSPACE = process.env.SANDBOXD_WORKSPACE || '/workspace';
const PID_FILE = process.env.SANDBOXD_DEV_PID_FILE || '/tmp/sandboxd-dev.pid';
const INIT_DONE_FILE = '/tmp/sandboxd-init.done';
const LOCK_FILE = PID_FILE + '.lock';
const FALLBACK_LOG = '/tmp/sandboxd-dev.log';
const PORT = '5173';
const DEFAULT_COMMAND = `npm run dev -- --host 0.0.0.0 --port ${PORT}`;
const MAX_LOG_BYTES = 5 * 1024 * 1024;
const STOP_GRACE_MS = 2000;
const SHUTDOWN_GRACE_MS = 1000;

function logErr(msg) {
  try {
    process.stderr.write(`[sandboxd-init] ${new Date().toISOString()} ${msg}\n`);
  } catch (_) {
    /* nothing left to do */
  }
}

function emit(obj) {
  process.stdout.write(JSON.stringify(obj) + '\n');
}

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

function isInside(root, p) {
  return p === root || p.startsWith(root.endsWith(path.sep) ? root : root + path.sep);
}

function readJson(file) {
  return JSON.parse(fs.readFileSync(file, 'utf8'));
}

function hasDevScript(dir) {
  const pkgPath = path.join(dir, 'package.json');
  let pkg;
  try {
    pkg = readJson(pkgPath);
  } catch (e) {
    return false;
  }
  return !!(pkg && typeof pkg === 'object' && pkg.scripts && typeof pkg.scripts.dev === 'string' && pkg.scripts.dev.trim() !== '');
}

function envCommand() {
  const c = process.env.SANDBOXD_DEV_COMMAND;
  return typeof c === 'string' && c.trim() !== '' ? c : null;
}

// Returns {ok:true, cwd, command, source} or {ok:false, cwd, reason}.
function discover() {
  let root;
  try {
    root = fs.realpathSync(WORKSPACE);
  } catch (e) {
    return { ok: false, cwd: null, reason: `workspace ${WORKSPACE} not accessible: ${e.code || e.message}` };
  }

  const previewPath = path.join(root, '.sandboxd', 'preview.json');
  let previewExists = false;
  try {
    fs.lstatSync(previewPath);
    previewExists = true;
  } catch (_) {
    previewExists = false;
  }

  if (previewExists) {
    let realPreview;
    try {
      realPreview = fs.realpathSync(previewPath);
    } catch (e) {
      return { ok: false, cwd: null, reason: `preview.json not readable: ${e.code || e.message}` };
    }
    if (!isInside(root, realPreview)) {
      return { ok: false, cwd: null, reason: 'preview.json resolves outside the workspace' };
    }
    let cfg;
    try {
      cfg = readJson(realPreview);
    } catch (e) {
      return { ok: false, cwd: null, reason: `invalid preview.json: ${e.message}` };
    }
    if (!cfg || typeof cfg !== 'object' || Array.isArray(cfg)) {
      return { ok: false, cwd: null, reason: 'invalid preview.json: not a JSON object' };
    }
    const rel = cfg.cwd === undefined || cfg.cwd === null ? '.' : cfg.cwd;
    if (typeof rel !== 'string' || rel.includes('\0')) {
      return { ok: false, cwd: null, reason: 'invalid preview.json: "cwd" must be a string' };
    }
    if (path.isAbsolute(rel)) {
      return { ok: false, cwd: null, reason: 'invalid preview.json: "cwd" must be relative to the workspace' };
    }
    if (cfg.command !== undefined && cfg.command !== null && typeof cfg.command !== 'string') {
      return { ok: false, cwd: null, reason: 'invalid preview.json: "command" must be a string' };
    }
    let cwd;
    try {
      cwd = fs.realpathSync(path.resolve(root, rel));
    } catch (e) {
      return { ok: false, cwd: null, reason: `preview cwd "${rel}" does not exist` };
    }
    if (!isInside(root, cwd)) {
      return { ok: false, cwd: null, reason: `preview cwd "${rel}" escapes the workspace` };
    }
    let st;
    try {
      st = fs.statSync(cwd);
    } catch (e) {
      return { ok: false, cwd, reason: `preview cwd not accessible: ${e.code || e.message}` };
    }
    if (!st.isDirectory()) {
      return { ok: false, cwd, reason: `preview cwd "${rel}" is not a directory` };
    }
    const jsonCommand = typeof cfg.command === 'string' && cfg.command.trim() !== '' ? cfg.command : null;
    const command = envCommand() || jsonCommand;
    if (!command && !hasDevScript(cwd)) {
      return { ok: false, cwd, reason: 'preview.json has no "command" and its cwd has no package.json scripts.dev' };
    }
    return { ok: true, cwd, command: command || DEFAULT_COMMAND, source: 'preview.json' };
  }

  if (hasDevScript(root)) {
    return { ok: true, cwd: root, command: envCommand() || DEFAULT_COMMAND, source: 'package.json' };
  }
  return { ok: false, cwd: null, reason: 'no preview app (no .sandboxd/preview.json and no scripts.dev in package.json)' };
}

// ---- process group bookkeeping ----

function readPid() {
  let text;
  try {
    text = fs.readFileSync(PID_FILE, 'utf8').trim();
  } catch (_) {
    return null;
  }
  const pid = Number.parseInt(text, 10);
  return Number.isInteger(pid) && pid > 1 && String(pid) === text ? pid : null;
}

function groupAlive(pgid) {
  if (!pgid || pgid <= 1) return false;
  try {
    process.kill(-pgid, 0);
  } catch (e) {
    if (e.code === 'EPERM') return true;
    return false;
  }
  // Zombies still count for kill(0); ignore a group whose only member is a
  // zombie leader (tini reaps it shortly anyway).
  try {
    const stat = fs.readFileSync(`/proc/${pgid}/stat`, 'utf8');
    const state = stat.slice(stat.lastIndexOf(')') + 2).split(' ')[0];
    if (state === 'Z' || state === 'X') {
      // Leader is dead; the group may still have live members.
      return groupHasLiveMember(pgid);
    }
  } catch (_) {
    return groupHasLiveMember(pgid);
  }
  return true;
}

function groupHasLiveMember(pgid) {
  let entries;
  try {
    entries = fs.readdirSync('/proc');
  } catch (_) {
    return true; // cannot tell; assume alive
  }
  for (const name of entries) {
    if (!/^\d+$/.test(name)) continue;
    try {
      const stat = fs.readFileSync(`/proc/${name}/stat`, 'utf8');
      const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
      // fields[0] = state, fields[1] = ppid, fields[2] = pgrp
      if (Number(fields[2]) === pgid && fields[0] !== 'Z' && fields[0] !== 'X') return true;
    } catch (_) {
      /* process vanished */
    }
  }
  return false;
}

function runningPid() {
  const pid = readPid();
  return pid && groupAlive(pid) ? pid : null;
}

function removePidFile(expectedPid) {
  try {
    if (expectedPid !== undefined && readPid() !== expectedPid) return;
    fs.unlinkSync(PID_FILE);
  } catch (_) {
    /* already gone */
  }
}

function signalGroup(pgid, sig) {
  try {
    process.kill(-pgid, sig);
    return true;
  } catch (_) {
    return false;
  }
}

async function stopGroup(pgid, graceMs) {
  if (!groupAlive(pgid)) return false;
  signalGroup(pgid, 'SIGTERM');
  // Some servers ignore SIGTERM but honour SIGINT/SIGHUP; SIGTERM is enough
  // for node, npm and vite.
  const deadline = Date.now() + graceMs;
  while (Date.now() < deadline) {
    await sleep(50);
    if (!groupAlive(pgid)) return true;
  }
  signalGroup(pgid, 'SIGKILL');
  const killDeadline = Date.now() + 1000;
  while (Date.now() < killDeadline) {
    await sleep(25);
    if (!groupAlive(pgid)) break;
  }
  return true;
}

// Simple exclusive lock so that concurrent --start-dev calls do not start two
// servers. A lock whose owner is dead is stale and taken over.
async function withLock(fn) {
  const deadline = Date.now() + 5000;
  let fd = null;
  while (fd === null) {
    try {
      fd = fs.openSync(LOCK_FILE, 'wx', 0o600);
      fs.writeSync(fd, String(process.pid));
    } catch (e) {
      if (e.code !== 'EEXIST') throw e;
      let owner = null;
      try {
        owner = Number.parseInt(fs.readFileSync(LOCK_FILE, 'utf8'), 10);
      } catch (_) {
        /* lock vanished or is being written */
      }
      let ownerAlive = false;
      if (owner > 0) {
        try {
          process.kill(owner, 0);
          ownerAlive = true;
        } catch (err) {
          ownerAlive = err.code === 'EPERM';
        }
      }
      if ((owner > 0 && !ownerAlive) || Date.now() > deadline) {
        try {
          fs.unlinkSync(LOCK_FILE);
        } catch (_) {
          /* someone else removed it */
        }
      } else {
        await sleep(50);
      }
    }
  }
  try {
    return await fn();
  } finally {
    try {
      fs.closeSync(fd);
    } catch (_) {
      /* ignore */
    }
    try {
      fs.unlinkSync(LOCK_FILE);
    } catch (_) {
      /* ignore */
    }
  }
}

// ---- log file ----

function openLog() {
  try {
    const root = fs.realpathSync(WORKSPACE);
    const dir = path.join(root, '.sandboxd');
    fs.mkdirSync(dir, { recursive: true, mode: 0o755 });
    const realDir = fs.realpathSync(dir);
    if (!isInside(root, realDir)) throw new Error('.sandboxd resolves outside the workspace');
    const logPath = path.join(realDir, 'dev.log');
    const lst = (() => {
      try {
        return fs.lstatSync(logPath);
      } catch (_) {
        return null;
      }
    })();
    if (lst && !lst.isFile()) throw new Error('dev.log is not a regular file');
    if (lst && lst.size > MAX_LOG_BYTES) fs.truncateSync(logPath, 0);
    const fd = fs.openSync(logPath, fs.constants.O_WRONLY | fs.constants.O_APPEND | fs.constants.O_CREAT | fs.constants.O_NOFOLLOW, 0o644);
    return { fd, logPath };
  } catch (e) {
    logErr(`cannot open workspace dev.log (${e.code || e.message}); using ${FALLBACK_LOG}`);
  }
  try {
    let size = 0;
    try {
      size = fs.statSync(FALLBACK_LOG).size;
    } catch (_) {
      size = 0;
    }
    if (size > MAX_LOG_BYTES) fs.truncateSync(FALLBACK_LOG, 0);
    const fd = fs.openSync(FALLBACK_LOG, 'a', 0o644);
    return { fd, logPath: FALLBACK_LOG };
  } catch (e) {
    logErr(`cannot open ${FALLBACK_LOG} either (${e.code || e.message}); dev server output is discarded`);
    return { fd: null, logPath: null };
  }
}

// ---- roles ----

let ownChild = null; // dev server started by this process (no-args role)

async function startDev() {
  return withLock(async () => {
    const found = discover();
    if (!found.ok) {
      return { started: false, cwd: found.cwd, reason: found.reason };
    }
    const existing = runningPid();
    if (existing) {
      return { started: false, cwd: found.cwd, reason: 'already running', pid: existing };
    }
    removePidFile();

    const { fd, logPath } = openLog();
    if (fd !== null) {
      try {
        fs.writeSync(fd, `\n=== sandboxd-init ${new Date().toISOString()}: starting dev server in ${found.cwd}: ${found.command}\n`);
      } catch (_) {
        /* best effort */
      }
    }
    const env = Object.assign({}, process.env, { PORT, HOST: '0.0.0.0', BROWSER: 'none' });
    let child;
    try {
      child = spawn('bash', ['-c', found.command], {
        cwd: found.cwd,
        env,
        detached: true, // setsid(): own session and process group
        stdio: ['ignore', fd === null ? 'ignore' : fd, fd === null ? 'ignore' : fd],
      });
    } catch (e) {
      if (fd !== null) fs.closeSync(fd);
      return { started: false, cwd: found.cwd, reason: `spawn failed: ${e.message}` };
    }
    if (fd !== null) {
      try {
        fs.closeSync(fd);
      } catch (_) {
        /* ignore */
      }
    }
    child.on('error', (e) => logErr(`dev server error: ${e.message}`));
    if (!child.pid) {
      return { started: false, cwd: found.cwd, reason: 'spawn failed: no pid' };
    }
    try {
      fs.writeFileSync(PID_FILE, String(child.pid) + '\n', { mode: 0o644 });
    } catch (e) {
      logErr(`cannot write ${PID_FILE}: ${e.message}`);
    }
    const pid = child.pid;
    child.on('exit', (code, signal) => {
      logErr(`dev server (pid ${pid}) exited with ${signal ? 'signal ' + signal : 'code ' + code}`);
      if (!groupAlive(pid)) removePidFile(pid);
    });
    child.unref();
    ownChild = child;
    return {
      started: true,
      cwd: found.cwd,
      reason: 'started',
      pid,
      source: found.source,
      command: found.command,
      log: logPath,
    };
  });
}

async function stopDev(graceMs) {
  const pid = readPid();
  let stopped = false;
  if (pid && groupAlive(pid)) {
    stopped = await stopGroup(pid, graceMs);
  }
  removePidFile(pid === null ? undefined : pid);
  return { stopped, pid: pid || null };
}

function status() {
  const pid = runningPid();
  const found = discover();
  return { running: !!pid, pid: pid || null, app: found.ok, cwd: found.cwd, reason: found.ok ? null : found.reason };
}

async function runForever() {
  process.on('uncaughtException', (e) => logErr(`uncaught exception: ${(e && e.stack) || e}`));
  process.on('unhandledRejection', (e) => logErr(`unhandled rejection: ${(e && e.stack) || e}`));
  process.on('SIGHUP', () => {});
  process.on('SIGPIPE', () => {});

  let shuttingDown = false;
  const shutdown = async (sig) => {
    if (shuttingDown) return;
    shuttingDown = true;
    logErr(`received ${sig}; stopping dev server`);
    try {
      const pids = new Set();
      const filePid = readPid();
      if (filePid) pids.add(filePid);
      if (ownChild && ownChild.pid) pids.add(ownChild.pid);
      await Promise.all([...pids].map((p) => stopGroup(p, SHUTDOWN_GRACE_MS).catch(() => false)));
      removePidFile();
    } catch (e) {
      logErr(`error while stopping: ${e.message}`);
    }
    process.exit(0);
  };
  process.on('SIGTERM', () => shutdown('SIGTERM'));
  process.on('SIGINT', () => shutdown('SIGINT'));

  // Keep the process alive regardless of what happens below.
  setInterval(() => {}, 1 << 30);

  try {
    emit(await startDev());
  } catch (e) {
    logErr(`could not start dev server: ${(e && e.stack) || e}`);
  }
  // Tells sandboxd that discovery is over: until this file exists a preview request keeps
  // waiting for an app that may still be starting (slow starts under load).
  try {
    fs.writeFileSync(INIT_DONE_FILE, 'done\n', { mode: 0o644 });
  } catch (e) {
    logErr(`cannot write ${INIT_DONE_FILE}: ${e.message}`);
  }
}

async function main() {
  const args = process.argv.slice(2);
  const role = args[0] || '';
  switch (role) {
    case '':
      await runForever();
      return;
    case '--start-dev':
      emit(await startDev());
      process.exit(0);
      break;
    case '--stop-dev':
      emit(await stopDev(STOP_GRACE_MS));
      process.exit(0);
      break;
    case '--restart-dev': {
      const stop = await stopDev(STOP_GRACE_MS);
      const start = await startDev();
      emit(Object.assign({ stopped: stop.stopped }, start));
      process.exit(0);
      break;
    }
    case '--status':
      emit(status());
      process.exit(0);
      break;
    case '-h':
    case '--help':
      process.stdout.write('usage: sandboxd-init [--start-dev|--stop-dev|--restart-dev|--status]\n');
      process.exit(0);
      break;
    default:
      process.stderr.write(`sandboxd-init: unknown argument ${JSON.stringify(role)}\n`);
      process.exit(2);
  }
}

main().catch((e) => {
  logErr(`fatal: ${(e && e.stack) || e}`);
  process.exit(1);
});
