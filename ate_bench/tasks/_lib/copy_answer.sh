#!/usr/bin/env bash
# The scripted "agent" of an understand task's reference: writes the reference answer.
set -eu
cp "$ATE_TASK_DIR/reference/answer.md" answer.md
echo '{"role": "assistant", "content": "wrote answer.md"}' >> "$ATE_TRANSCRIPT"
