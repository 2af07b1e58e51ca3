#!/usr/bin/env bash
# Restarts the sandbox's agent when the edge cannot reach it: `--replace` kills whatever of the
# sandbox user's listens on the agent's port (a stuck agent, or a program that took the port),
# binds it, and goes to the background once it listens; this exits then (0 when the new agent
# accepts). Run attached by the edge, to its end.
# Environment: SANDBOXD_AGENT_KEY (the sandbox's key; never an argument). No arguments.
exec sandboxd-agent --replace
