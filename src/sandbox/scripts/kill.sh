#!/usr/bin/env bash
# Kills every process of one code execution or one terminal, from inside the container; reads
# /proc only (no procps needed). Passes repeat until nothing is left, so a process that forks
# during a sweep is caught by the next one. Exits 0 when nothing is left, 1 when processes
# remain after the last pass, 2 on a bad argument.
# $1: the mark variable (SANDBOXD_EXEC or SANDBOXD_TERMINAL); a process is marked when its
#     environment holds "$1=$2" (inherited through fork and exec, so it finds descendants that
#     left the session).
# $2: the run or terminal id (server-generated hex).
# $3: which sessions go with the marked processes:
#     led    the sessions a marked process leads. A code execution runs in a session of its
#            own, and a marked process may sit in a session it does not own only because it
#            called setsid: the session it joined is not the run's.
#     joined every session a marked process is in. A terminal's shell may start jobs in other
#            sessions of the terminal's PTY, all of them the terminal's.
# $4: seconds to wait between passes.
var=$1 id=$2 scope=$3 pause=$4
case "$var" in SANDBOXD_EXEC | SANDBOXD_TERMINAL) ;; *) exit 2 ;; esac
case "$id" in '' | *[!0-9a-f]*) exit 2 ;; esac
case "$scope" in led | joined) ;; *) exit 2 ;; esac
case "$pause" in '' | *[!0-9.]*) exit 2 ;; esac
mark="$var=$id"
for _ in 1 2 3 4 5 6 7 8; do
  declare -A ppid=() sid=() take=() sess=()
  for d in /proc/[0-9]*; do
    p=${d#/proc/}
    { read -r line < "$d/stat"; } 2>/dev/null || continue
    # The fields after the command name, which ends at the last ')'; word splitting is wanted.
    # shellcheck disable=SC2086
    set -- ${line##*) }
    ppid[$p]=$2
    sid[$p]=$4
  done
  for p in "${!sid[@]}"; do
    [ "$p" -gt 1 ] || continue
    [ "$p" != "$$" ] || continue
    while IFS= read -r -d '' e; do
      if [ "$e" = "$mark" ]; then
        take[$p]=1
        if [ "$scope" = led ]; then
          [ "${sid[$p]}" = "$p" ] && sess[$p]=1
        else
          [ "${sid[$p]}" -gt 1 ] && sess[${sid[$p]}]=1
        fi
        break
      fi
    done 2>/dev/null < "/proc/$p/environ"
  done
  for p in "${!sid[@]}"; do
    [ "$p" -gt 1 ] && [ "$p" != "$$" ] && [ -n "${sess[${sid[$p]}]}" ] && take[$p]=1
  done
  grew=1
  while [ "$grew" = 1 ]; do
    grew=0
    for p in "${!ppid[@]}"; do
      if [ -z "${take[$p]}" ] && [ "$p" != "$$" ] && [ -n "${take[${ppid[$p]}]}" ]; then
        take[$p]=1
        grew=1
      fi
    done
  done
  [ "${#take[@]}" -eq 0 ] && exit 0
  kill -KILL "${!take[@]}" 2>/dev/null
  sleep "$pause"
done
exit 1
