#!/usr/bin/env bash
# Build the Debian package from an already built keyfence binary and check
# what it installs:  scripts/package-test.sh [PROFILE]   (default release)
# scripts/test.sh runs it with the profile it built, so CI compiles nothing
# more for it. Fails with the missing file or the failing check.
set -euo pipefail
cd "$(dirname "$0")/.."
profile="${1:-release}"

deb=$(KEYFENCE_DEB_FAST=1 scripts/package.sh --no-build "$profile" | tail -n 1)
[ -f "$deb" ] || { echo "package-test: cargo deb produced no package ($deb)" >&2; exit 1; }
echo "package: $deb"

listing=$(dpkg -c "$deb")
fail=0
expect() { # PATH [-> TARGET]
    local path=$1 line
    line=$(awk -v p="./$path" '$6 == p' <<<"$listing")
    if [ -z "$line" ]; then
        echo "package-test: $path is not in the package" >&2
        fail=1
    elif [ $# -eq 3 ] && ! awk -v t="$3" '$7 == "->" && $8 == t { ok = 1 } END { exit !ok }' <<<"$line"; then
        echo "package-test: $path is not a link to $3: $line" >&2
        fail=1
    fi
}
expect usr/bin/keyfence
expect usr/bin/keyfence-sg_persist '->' keyfence
expect usr/bin/keyfence-mpathpersist '->' keyfence
expect usr/sbin/fence_keyfence '->' ../bin/keyfence
expect usr/lib/systemd/system/keyfence.service
expect etc/keyfence/keyfence.toml
expect usr/share/doc/keyfence/examples/keyfence.toml
expect usr/share/bash-completion/completions/keyfence
expect usr/share/zsh/vendor-completions/_keyfence
expect usr/share/fish/vendor_completions.d/keyfence.fish
for page in keyfence keyfence-serve keyfence-status keyfence-reload keyfence-persist keyfence-mpathpersist keyfence-takeover \
    keyfence-pr keyfence-pr-show keyfence-bench keyfence-fence keyfence-fence-check \
    keyfence-fence-acquire keyfence-fence-race keyfence-install-links keyfence-man \
    keyfence-completions; do
    expect "usr/share/man/man1/$page.1.gz"
done
expect usr/share/man/man8/fence_keyfence.8.gz
# Never the names sg3-utils and multipath-tools own.
for clash in usr/bin/sg_persist usr/sbin/sg_persist usr/bin/mpathpersist usr/sbin/mpathpersist; do
    if awk -v p="./$clash" '$6 == p { found = 1 } END { exit !found }' <<<"$listing"; then
        echo "package-test: the package installs $clash, which belongs to sg3-utils/multipath-tools" >&2
        fail=1
    fi
done

# The control data: the config is a conffile, the unit's scripts exist.
ctl=$(mktemp -d)
root=$(mktemp -d)
trap 'rm -rf "$ctl" "$root"' EXIT
dpkg-deb -e "$deb" "$ctl"
grep -qx /etc/keyfence/keyfence.toml "$ctl/conffiles" \
    || { echo "package-test: /etc/keyfence/keyfence.toml is not a conffile" >&2; fail=1; }
grep -q "deb-systemd-helper" "$ctl/postinst" \
    || { echo "package-test: postinst does not register keyfence.service" >&2; fail=1; }

# Unpacked: the files are the ones in the tree, the links run the right
# personalities, and the pages render.
dpkg-deb -x "$deb" "$root"
cmp dist/keyfence.service "$root/usr/lib/systemd/system/keyfence.service" || fail=1
cmp dist/keyfence.toml "$root/etc/keyfence/keyfence.toml" || fail=1
"$root/usr/bin/keyfence-sg_persist" -h 2>&1 | grep -q "^Usage: sg_persist" \
    || { echo "package-test: keyfence-sg_persist -h is not sg_persist's usage" >&2; fail=1; }
"$root/usr/bin/keyfence-mpathpersist" -h 2>&1 | grep -q "^Usage: mpathpersist" \
    || { echo "package-test: keyfence-mpathpersist -h is not mpathpersist's usage" >&2; fail=1; }
"$root/usr/sbin/fence_keyfence" -o metadata | grep -q '<resource-agent name="fence_keyfence"' \
    || { echo "package-test: fence_keyfence -o metadata gave no agent metadata" >&2; fail=1; }
for page in "$root"/usr/share/man/man*/*.gz; do
    err=$(zcat "$page" | groff -man -Tutf8 -ww -z 2>&1) || true
    [ -z "$err" ] || { echo "package-test: $page: $err" >&2; fail=1; }
done

if [ "$fail" -ne 0 ]; then
    echo "package-test: FAILED; the package lists:" >&2
    echo "$listing" >&2
    exit 1
fi
echo "$listing" | awk '$6 !~ /\/$/ { print $6, $7, $8 }'
echo "package-test: ok ($(grep -c . <<<"$listing") entries)"
