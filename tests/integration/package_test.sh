#!/usr/bin/env bash
# The Debian package, the way an installer meets it: build the .deb with cpack, install it with
# `apt-get install ./medgate_*.deb` in a clean Debian 12 root (debootstrap --variant=minbase, in a
# chroot), run `medctl init` against SoftHSM there, start medgated by hand as the medgate user
# (there is no systemd in the root: the PIN is handed over the way LoadCredential= does), check
# `medctl status`, stop it, then `apt-get remove` and `apt-get purge` and check what is left; last,
# install it again and open the ledger the purge kept, as its README.purged says.
#
#   package_test.sh BUILD_DIR          (a configured and built tree; cpack runs in it)
#
# Needs root, debootstrap, dpkg-dev, groff and the Debian mirror named in
# /etc/apt/sources.list.d/*.sources -- all there on a machine set up by ./setup. It fails (never
# skips) when any of it is missing.
#
# Run time: the base root is made once and kept as a tarball in $MEDGATE_PKG_CACHE (default
# /var/tmp/medgate-pkg-test), with apt's downloaded packages beside it; later runs unpack it and
# install from there (10-45 s). Everything in the root runs in its own mount and PID namespace, so
# the mounts and any process left in it vanish with the test, even when a step fails.
set -euo pipefail

T0=$SECONDS
say() { printf '%s\n' "$*"; }
fail() { say "FAIL: $*" >&2; exit 1; }
step() { say "== $* ($((SECONDS - T0)) s)"; }
ok() { say "ok   $*"; }

# ---- the part inside the namespaces (the script runs itself here) ------------------------------
if [[ ${1-} == --inside ]]; then
  work=$2 cache=$3
  SECONDS=$4  # go on counting from the outside's clock
  root=$work/root
  mount -t proc proc "$root/proc"
  mount --bind /dev "$root/dev"  # not --rbind: nothing under /dev is needed, nothing to undo
  mount --bind "$cache/archives" "$root/var/cache/apt/archives"

  in_root() {
    chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 \
      DEBIAN_FRONTEND=noninteractive "$@"
  }
  # run DESCRIPTION CMD...: runs CMD in the root with its output in $work/log; fails with its tail.
  run() {
    local what=$1
    shift
    if ! in_root "$@" >"$work/log" 2>&1; then
      say "---- last lines of the output:"
      tail -25 "$work/log"
      fail "$what"
    fi
    ok "$what"
  }
  gone() { for p in "$@"; do [[ ! -e $root$p && ! -L $root$p ]] || fail "$p is still there"; done; }
  there() { for p in "$@"; do [[ -e $root$p ]] || fail "$p is missing"; done; }
  mode() {  # path "mode user group"
    local got
    got=$(in_root stat -c '%a %U %G' "$1") || fail "$1 is missing"
    [[ $got == "$2" ]] || fail "$1 is $got, want $2"
  }

  # start_daemon: medgated in the background as the unit runs it; waits for its socket.
  start_daemon() {
    # What systemd does for the unit: RuntimeDirectory=medgate, LoadCredential=hsm-pin:..., User=,
    # SupplementaryGroups=, no capabilities.
    in_root install -d -o medgate -g medgate -m 0755 /run/medgate
    in_root install -d -o medgate -g medgate -m 0700 /run/credentials/medgated.service
    in_root install -o medgate -g medgate -m 0400 /etc/medgate/hsm-pin /run/credentials/medgated.service/hsm-pin
    # chroot, env and setpriv each exec the next, so $! ends up being medgated itself.
    chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 \
      CREDENTIALS_DIRECTORY=/run/credentials/medgated.service \
      setpriv --reuid=medgate --regid=medgate --groups=medgate-admin,tss --inh-caps=-all \
      --bounding-set=-all medgated --config /etc/medgate/medgated.toml >"$work/medgated.log" 2>&1 &
    daemon=$!
    up=0
    for _ in $(seq 1 150); do
      if in_root medctl status >/dev/null 2>&1; then up=1; break; fi
      kill -0 "$daemon" 2>/dev/null || break
      sleep 0.1
    done
    [[ $up -eq 1 ]] || { tail -20 "$work/medgated.log"; fail "medgated did not answer on /run/medgate/admin.sock"; }
  }
  stop_daemon() {
    kill -TERM "$daemon"
    local rc=0
    wait "$daemon" || rc=$?
    [[ $rc -eq 0 ]] || { tail -20 "$work/medgated.log"; fail "medgated exited $rc on SIGTERM"; }
    ok "medgated stops cleanly on SIGTERM"
  }

  step "apt-get install ./$(basename "$work"/root/tmp/medgate_*.deb)"
  run "apt-get update" apt-get update -q
  # Two runs at once would share the package cache: one installs at a time.
  if ! flock "$cache/archives.lock" chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin \
         HOME=/root LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive \
         sh -c 'apt-get install -y -q /tmp/medgate_*.deb' >"$work/install.log" 2>&1; then
    tail -30 "$work/install.log"
    fail "apt-get install of the package"
  fi
  ok "apt-get install ./medgate_*.deb (with its dependencies and Recommends)"
  grep -q "run \`medctl init\`" "$work/install.log" || fail "postinst did not say what to do next"

  step "what the package installed"
  there /usr/bin/medgated /usr/bin/medctl /usr/bin/medgate-mllp-send \
    /usr/lib/systemd/system/medgated.service /usr/lib/sysusers.d/medgate.conf \
    /usr/lib/tmpfiles.d/medgate.conf /usr/share/man/man8/medctl.8.gz \
    /usr/share/man/man8/medgated.8.gz /usr/share/man/man5/medgated.toml.5.gz \
    /usr/share/bash-completion/completions/medctl /usr/lib/softhsm/libsofthsm2.so
  ok "binaries, unit, sysusers.d, tmpfiles.d, man pages, completion; softhsm2 (Recommends)"
  grep -q '^ExecStart=/usr/bin/medgated --config /etc/medgate/medgated.toml$' \
    "$root/usr/lib/systemd/system/medgated.service" || fail "the unit does not run /usr/bin/medgated"
  in_root getent passwd medgate >/dev/null || fail "no user medgate"
  for g in medgate-admin medgate-audit tss; do in_root getent group "$g" >/dev/null || fail "no group $g"; done
  ok "postinst: systemd-sysusers made medgate, medgate-admin, medgate-audit, tss"
  mode /etc/medgate "750 root medgate"
  mode /etc/medgate/medgated.toml "640 root medgate"
  mode /var/lib/medgate "750 medgate medgate"
  ok "postinst: systemd-tmpfiles set /etc/medgate, the config and /var/lib/medgate"
  conffiles=$(in_root dpkg-query -W -f='${Conffiles}\n' medgate)
  grep -q '/etc/medgate/medgated.toml' <<<"$conffiles" || fail "/etc/medgate/medgated.toml is not a conffile"
  ok "/etc/medgate/medgated.toml is a conffile"
  gone /etc/systemd/system/multi-user.target.wants/medgated.service
  ok "the service is not enabled before init"
  got=$(in_root bash -c 'source /usr/share/bash-completion/completions/medctl
    COMP_WORDS=(medctl --json led); COMP_CWORD=2; _medctl; echo "${COMPREPLY[*]}"
    COMP_WORDS=(medctl device add pump-1 --kind ""); COMP_CWORD=5; _medctl; echo "${COMPREPLY[*]}"')
  [[ $got == $'ledger\ncoap hl7' ]] || fail "bash completion answered: $got"
  ok "bash completion completes medctl's commands and values"

  step "medctl init against SoftHSM, from the packaged config"
  rc=0
  in_root medgated --config /etc/medgate/medgated.toml >"$work/log" 2>&1 || rc=$?
  [[ $rc -eq 3 ]] || { cat "$work/log"; fail "medgated with the packaged config before init exited $rc, want 3 (no token yet; 2 would be a bad config)"; }
  ok "medgated accepts the packaged config (before init: no token, exit 3)"
  # The admin names the ledger, as the packaged config's first step says.
  sed -i 's/^id = "medgate"$/id = "ward-pkg"/' "$root/etc/medgate/medgated.toml"
  run "medctl init" medctl init
  grep -q "Created ledger 'ward-pkg'" "$work/log" || fail "init did not create ledger ward-pkg: $(cat "$work/log")"
  grep -q "used as it is" "$work/log" || fail "init did not use the packaged config as it is"
  mode /etc/medgate/hsm-pin "600 root root"
  [[ -z $(find "$root/var/lib/medgate" ! -user "$(in_root id -u medgate)") ]] \
    || fail "init left files in /var/lib/medgate that medgate does not own"
  there /var/lib/medgate/ledger.db /var/lib/medgate/vault.db /var/lib/medgate/signing-key.pem \
    /var/lib/medgate/softhsm/softhsm2.conf
  ok "token, PIN (/etc/medgate/hsm-pin, 0600 root), ledger and vault, owned by medgate"

  step "medgated by hand, as the unit would run it"
  start_daemon
  run "medctl status" medctl status
  grep -qE "^ledger +'ward-pkg': 1 entries" "$work/log" || fail "status: $(cat "$work/log")"
  grep -qE "^you +user:root \(admin\)" "$work/log" || fail "status does not show root as admin"
  mode /run/medgate/admin.sock "660 medgate medgate-admin"
  run "medctl ledger sign-head" medctl ledger sign-head
  run "medctl ledger verify (through the daemon)" medctl ledger verify
  rc=0
  in_root setpriv --reuid=nobody --regid=nogroup --clear-groups medctl status >"$work/log" 2>&1 || rc=$?
  [[ $rc -eq 1 || $rc -eq 3 ]] || fail "medctl status as nobody exited $rc, want a refusal"
  ok "nobody in particular is refused (exit $rc)"
  # The hardened daemon may write only its data dir: the backup's snapshots go there.
  run "medctl backup (the daemon snapshots into its data dir)" medctl backup /root/backup.mgb
  stop_daemon
  run "medctl ledger verify --db (offline, no daemon)" \
    medctl ledger verify --db /var/lib/medgate/ledger.db --trust /var/lib/medgate/signing-key.pem

  step "apt-get install over itself (the upgrade path of the maintainer scripts)"
  run "apt-get install --reinstall" apt-get install -y -q --reinstall /tmp/"$(basename "$root"/tmp/medgate_*.deb)"
  start_daemon
  run "medctl status after the reinstall" medctl status
  grep -qE "^ledger +'ward-pkg': [0-9]+ entries" "$work/log" || fail "status: $(cat "$work/log")"
  stop_daemon

  step "apt-get remove"
  run "apt-get remove medgate" apt-get remove -y -q medgate
  gone /usr/bin/medgated /usr/bin/medctl /usr/bin/medgate-mllp-send \
    /usr/lib/systemd/system/medgated.service /usr/lib/sysusers.d/medgate.conf \
    /usr/lib/tmpfiles.d/medgate.conf /usr/share/man/man8/medctl.8.gz \
    /usr/share/bash-completion/completions/medctl
  ok "binaries, unit, sysusers.d, tmpfiles.d, man pages and completion are gone"
  there /etc/medgate/medgated.toml /etc/medgate/hsm-pin /var/lib/medgate/ledger.db
  [[ $(in_root dpkg-query -W -f='${db:Status-Abbrev}' medgate) == "rc "* ]] || fail "medgate is not in state config-files"
  ok "config, PIN and ledger stay after remove (dpkg: config-files)"

  step "apt-get purge"
  run "apt-get purge medgate" apt-get purge -y -q medgate
  grep -q "README.purged" "$work/log" || fail "purge did not say where the data is"
  gone /etc/medgate
  ok "/etc/medgate is gone"
  there /var/lib/medgate/ledger.db /var/lib/medgate/vault.db /var/lib/medgate/softhsm/softhsm2.conf \
    /var/lib/medgate/README.purged /var/lib/medgate/package-removed/medgated.toml
  mode /var/lib/medgate/package-removed/hsm-pin "600 root root"
  grep -q '^id = "ward-pkg"$' "$root/var/lib/medgate/package-removed/medgated.toml" \
    || fail "the kept config is not the admin's"
  ok "the ledger, vault and token stay, with the config and PIN that open them and a note"
  state=$(in_root dpkg-query -W -f='${db:Status-Abbrev}' medgate 2>/dev/null || true)
  [[ -z $state || $state == "un "* ]] || fail "dpkg still knows medgate: '$state'"
  ok "medgate is purged"

  step "install again after the purge and come back to the kept ledger (README.purged)"
  run "apt-get install medgate again" apt-get install -y -q /tmp/"$(basename "$root"/tmp/medgate_*.deb)"
  in_root install -m 0640 /var/lib/medgate/package-removed/medgated.toml /etc/medgate/medgated.toml
  in_root install -m 0600 /var/lib/medgate/package-removed/hsm-pin /etc/medgate/hsm-pin
  run "systemd-tmpfiles --create medgate.conf" systemd-tmpfiles --create medgate.conf
  start_daemon
  run "medctl status" medctl status
  grep -qE "^ledger +'ward-pkg': [2-9] entries" "$work/log" || fail "status after coming back: $(cat "$work/log")"
  ok "the kept ledger opens again with the kept config and PIN"
  stop_daemon
  exit 0
fi

# ---- outside: prerequisites, the .deb, the base root -------------------------------------------
[[ $# -eq 1 && -d $1 ]] || { echo "usage: $0 BUILD_DIR" >&2; exit 2; }
build=$(realpath -- "$1")
[[ -f $build/CPackConfig.cmake ]] || fail "$build has no CPackConfig.cmake: configure it first"
[[ $(id -u) -eq 0 ]] || fail "needs root (debootstrap, chroot, mounts); run the suite as root, as ./setup machines do"
for tool in cpack dpkg-deb dpkg-shlibdeps file groff debootstrap unshare chroot flock tar; do
  command -v "$tool" >/dev/null || fail "$tool is not installed (./setup installs it)"
done
mirror=$(awk '/^URIs:/ { print $2; exit }' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
[[ -n $mirror ]] || mirror=$(awk '/^deb / { print $2; exit }' /etc/apt/sources.list 2>/dev/null || true)
[[ -n $mirror ]] || fail "no Debian mirror in /etc/apt/sources.list.d/*.sources or /etc/apt/sources.list"

cache=${MEDGATE_PKG_CACHE:-/var/tmp/medgate-pkg-test}
mkdir -p "$cache/archives/partial"
# A run killed outright (SIGKILL on a timeout) cannot clean up after itself: the next run removes
# its directory once its process is gone and nothing is mounted in it.
for old in "$cache"/run.*; do
  [[ -f $old/pid ]] || continue
  kill -0 "$(cat "$old/pid")" 2>/dev/null && continue
  grep -qF " $old/" /proc/self/mountinfo && continue
  rm -rf --one-file-system -- "$old"
done
work=$(mktemp -d "$cache/run.XXXXXX")
echo $$ >"$work/pid"
cleanup() {
  # The namespaces are gone by now, and their mounts with them. Only if the unshare itself
  # failed half-way could a mount be left: take it down before deleting anything.
  local m
  for m in "$work/root/var/cache/apt/archives" "$work/root/dev" "$work/root/proc" "$work"; do
    mountpoint -q "$m" 2>/dev/null && umount -l "$m"
  done
  rm -rf --one-file-system -- "$work"
}
trap cleanup EXIT

step "cpack -G DEB"
(cd "$build" && cpack -G DEB -B "$work/deb") >"$work/cpack.log" 2>&1 || { tail -20 "$work/cpack.log"; fail "cpack"; }
debs=("$work"/deb/medgate_*.deb)
[[ ${#debs[@]} -eq 1 && -f ${debs[0]} ]] || fail "cpack made no single medgate_*.deb: ${debs[*]}"
deb=${debs[0]}
version=$(dpkg-deb -f "$deb" Version)
arch=$(dpkg-deb -f "$deb" Architecture)
[[ $(basename "$deb") == "medgate_${version}_${arch}.deb" ]] || fail "$(basename "$deb") is not medgate_${version}_${arch}.deb"
[[ $arch == "$(dpkg --print-architecture)" ]] || fail "architecture $arch"
depends=$(dpkg-deb -f "$deb" Depends)
for lib in systemd libc6 libssl3 libsqlite3-0 libtss2-esys libtss2-tctildr0 libcoap3 libp11-kit0 \
           libsystemd0 libacl1 libfmt9 libtomlplusplus3; do
  [[ ", $depends" == *", $lib"* ]] || fail "Depends lacks $lib: $depends"
done
[[ $(dpkg-deb -f "$deb" Recommends) == *softhsm2* ]] || fail "softhsm2 is not recommended"
conffiles=$(dpkg-deb --ctrl-tarfile "$deb" | tar -xO ./conffiles)
[[ $conffiles == /etc/medgate/medgated.toml ]] || fail "the package's conffiles are '$conffiles'"
ok "$(basename "$deb"): Depends from dpkg-shlibdeps ($(tr -cd , <<<"$depends" | wc -c) + 1), Recommends softhsm2, one conffile"
mkdir "$work/x"
dpkg-deb -x "$deb" "$work/x"
for page in "$work"/x/usr/share/man/man*/*.gz; do
  warnings=$(gzip -dc "$page" | LC_ALL=C.UTF-8 groff -man -ww -z -Tutf8 2>&1) || fail "groff failed on $page"
  [[ -z $warnings ]] || fail "$(basename "$page"): $warnings"
done
ok "man pages: medctl(8), medgated(8), medgated.toml(5), gzipped, no groff warnings"

step "a clean Debian 12 root"
(
  flock 9
  if [[ ! -f $cache/bookworm-minbase.tar ]]; then
    say "debootstrap --variant=minbase bookworm (once; kept in $cache)"
    rm -rf --one-file-system "$cache/base"
    debootstrap --variant=minbase bookworm "$cache/base" "$mirror" >"$cache/debootstrap.log" 2>&1 \
      || { tail -15 "$cache/debootstrap.log"; exit 1; }
    tar -C "$cache/base" -cf "$cache/bookworm-minbase.tar.new" . && rm -rf --one-file-system "$cache/base"
    mv "$cache/bookworm-minbase.tar.new" "$cache/bookworm-minbase.tar"
  fi
) 9>"$cache/base.lock" || fail "debootstrap failed (see $cache/debootstrap.log)"
root=$work/root
mkdir "$root"
tar -C "$root" -xf "$cache/bookworm-minbase.tar"
# The host's Debian sources (with updates and security, so the root gets the library versions
# the binaries were linked against), and its resolver.
rm -f "$root/etc/apt/sources.list"
cp /etc/apt/sources.list.d/*.sources "$root/etc/apt/sources.list.d/" 2>/dev/null || true
if [[ -f /etc/apt/sources.list ]] && grep -q '^deb ' /etc/apt/sources.list; then cp /etc/apt/sources.list "$root/etc/apt/"; fi
cp /etc/resolv.conf "$root/etc/resolv.conf"
cp "$deb" "$root/tmp/"
ok "unpacked the cached bookworm minbase root"

rc=0
# unshare makes every mount private by remounting / (rprivate), which fails when / is not a mount
# point: inside a chroot, as in fresh-check's pristine root. There the work directory becomes a
# private mount of its own first, and the namespace keeps the propagation it inherits; what is
# mounted under the work directory then stays inside the namespace all the same.
propagation=private
if ! mountpoint -q /; then
  mount --bind "$work" "$work" && mount --make-rprivate "$work" || fail "cannot make $work a private mount"
  propagation=unchanged
fi
unshare --mount --pid --fork --kill-child --propagation "$propagation" -- \
  bash "${BASH_SOURCE[0]}" --inside "$work" "$cache" "$((SECONDS - T0))" || rc=$?
[[ $rc -eq 0 ]] || fail "the package did not install, run or go away cleanly (step above)"
say "PASS ($((SECONDS - T0)) s)"
