#!/usr/bin/env bash
# The scripted "agent" of an extend task's reference: copies the reference plugin folder into place.
set -eu
cp -r "$ATE_TASK_DIR/reference/plugins" .
echo '{"role": "assistant", "content": "added the plugin folder"}' >> "$ATE_TRANSCRIPT"
