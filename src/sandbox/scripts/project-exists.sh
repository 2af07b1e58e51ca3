#!/usr/bin/env bash
# Succeeds when /workspace/<name> exists (a dangling symlink counts).
# $1: the project name (validated: [a-z0-9][a-z0-9-_]{0,63}).
[ -e "/workspace/$1" ] || [ -L "/workspace/$1" ]
