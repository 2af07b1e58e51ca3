#!/usr/bin/env bash
# Scaffolds a React + Vite project in /workspace/<name> and installs its dependencies.
# $1: the project name (validated: [a-z0-9][a-z0-9-_]{0,63}).
set -e
cd /workspace
npm create --yes vite@latest "$1" -- --template react --no-interactive
cd -- "$1"
npm install --no-audit --no-fund
