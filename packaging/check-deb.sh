#!/usr/bin/env bash
# Builds the Debian package with cargo-deb, installs it with dpkg and checks what it
# installed: the configuration passes check-config, the rule lists pass check, the unit is
# valid. Run as root (CI does); it installs the package on this machine.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo-deb >/dev/null 2>&1; then
  # Pinned: later versions may refuse the dev profile CI packages with.
  cargo install --locked cargo-deb --version 3.8.0
fi
# CI passes DEB_PROFILE=dev to package the binary the tests already built: what is checked
# here is the package, not the optimiser. A release package is plain `cargo deb`.
cargo deb --locked --profile "${DEB_PROFILE:-release}"
# cargo-deb writes under the target directory, which CI may keep outside the clone.
deb="$(ls -t "${CARGO_TARGET_DIR:-target}"/debian/tlsrouter_*.deb | head -n 1)"
dpkg -i "$deb"

getent passwd tlsrouter >/dev/null || { echo "no tlsrouter user after install" >&2; exit 1; }
getent group tlsrouter-admin >/dev/null || { echo "no tlsrouter-admin group after install" >&2; exit 1; }
/usr/bin/tlsrouter check-config /etc/tlsrouter/tlsrouter.yaml
for rules in /usr/share/tlsrouter/rules/*.yaml; do
  /usr/bin/tlsrouter check "$rules"
done
if command -v systemd-analyze >/dev/null 2>&1; then
  systemd-analyze verify /usr/lib/systemd/system/tlsrouter.service
fi
echo "package $deb: installed and checked"
