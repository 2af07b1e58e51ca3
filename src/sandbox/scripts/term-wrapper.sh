#!/usr/bin/env bash
# The first process on a terminal's new PTY, run by `script` (through `$SHELL -c`, bash):
# applies the initial size, then becomes the login shell (same pid, so it stays the session
# leader).
# Environment: SANDBOXD_TERMINAL_ROWS, SANDBOXD_TERMINAL_COLS (server-made numbers), unset
# before the shell starts. SANDBOXD_AGENT_KEY (the container's, for its agent only) is unset too.
stty rows "$SANDBOXD_TERMINAL_ROWS" cols "$SANDBOXD_TERMINAL_COLS" 2>/dev/null
unset SANDBOXD_TERMINAL_ROWS SANDBOXD_TERMINAL_COLS SANDBOXD_AGENT_KEY
exec bash -l
