#!/usr/bin/env bash
# Runs one code execution: the code arrives on stdin, is written to a file under
# /workspace/.sandboxd/exec and runs with node. Started under `setsid -w`, so bash leads a new
# session and `$$` is the session id kill.sh targets.
# $1: the run id (server-generated hex). The run's processes carry SANDBOXD_EXEC=<run id>.
d=/workspace/.sandboxd/exec
mkdir -p "$d" && echo $$ > "$d/$1.pid" || exit 125
cat > "$d/$1.js" || exit 125
node "$d/$1.js"
rc=$?
rm -f "$d/$1.js" "$d/$1.pid"
exit $rc
