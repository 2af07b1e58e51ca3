#!/usr/bin/env bash
# Resizes one terminal's PTY. The PTY is the stdin of the shell `script` started: the marked
# session leader whose parent is the marked process the engine started (pid 0 as its parent).
# $1: the terminal id (server-generated hex); $2: cols; $3: rows (both checked to be numbers).
id=$1 cols=$2 rows=$3
case "$id" in '' | *[!0-9a-f]*) exit 2 ;; esac
case "$cols" in '' | *[!0-9]*) exit 2 ;; esac
case "$rows" in '' | *[!0-9]*) exit 2 ;; esac
mark="SANDBOXD_TERMINAL=$id"
marked() {
  while IFS= read -r -d '' e; do [ "$e" = "$mark" ] && return 0; done 2>/dev/null < "/proc/$1/environ"
  return 1
}
declare -A ppid=() sid=()
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
  [ "${sid[$p]}" = "$p" ] || continue
  q=${ppid[$p]}
  [ -n "$q" ] || continue
  [ "${ppid[$q]}" = 0 ] || continue
  marked "$p" || continue
  marked "$q" || continue
  t=$(readlink "/proc/$p/fd/0") || continue
  case "$t" in /dev/pts/[0-9]*) exec stty -F "$t" rows "$rows" cols "$cols" ;; esac
done
exit 1
