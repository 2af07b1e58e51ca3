#!/usr/bin/env bash
# Succeeds while an app may still start listening: the init has not finished discovery yet,
# or the dev server it started (its pid file) is alive. No arguments.
[ ! -e /tmp/sandboxd-init.done ] && exit 0
p=$(cat /tmp/sandboxd-dev.pid 2>/dev/null) && [ -n "$p" ] && kill -0 "$p" 2>/dev/null
