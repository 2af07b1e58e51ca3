#!/usr/bin/env bash
# Removes the files of one code execution after kill.sh ended it (exec-run.sh removes them
# itself when the run ends on its own).
# $1: the run id (server-generated hex).
case "$1" in '' | *[!0-9a-f]*) exit 2 ;; esac
d=/workspace/.sandboxd/exec
rm -f "$d/$1.js" "$d/$1.pid"
