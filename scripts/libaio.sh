#!/usr/bin/env bash
# libaio for DeepSpeed's async_io op, which NVMe offload (deepspeed=zero3_nvme) compiles at its first use.
#
# DeepSpeed decides whether async_io can be built by compiling and linking a test program with -laio
# (AsyncIOBuilder.is_compatible); the op's sources also include <libaio.h>. Both come from the development
# package (Debian/Ubuntu libaio-dev, Fedora/RHEL libaio-devel), not the runtime library alone. A libaio
# installed elsewhere (e.g. conda-forge's) is found through CFLAGS=-I<prefix>/include LDFLAGS=-L<prefix>/lib.
#
#   scripts/libaio.sh            install it with apt-get when missing and root; otherwise print the command
#   scripts/libaio.sh --require  the same, but exit 1 when it is still missing (CI)
set -euo pipefail

require=false
[ "${1:-}" = "--require" ] && require=true

have_libaio() {
    local cc=${CC:-cc}
    command -v "$cc" > /dev/null || return 1
    # shellcheck disable=SC2086  # CFLAGS/LDFLAGS are word lists, as DeepSpeed reads them
    printf '#include <libaio.h>\nint main(void) { io_context_t ctx = 0; return io_setup(1, &ctx); }\n' \
        | "$cc" ${CFLAGS:-} -x c - -o /dev/null ${LDFLAGS:-} -laio 2> /dev/null
}

install_command() {
    if command -v apt-get > /dev/null; then echo "apt-get install -y libaio-dev"
    elif command -v dnf > /dev/null; then echo "dnf install -y libaio-devel"
    elif command -v yum > /dev/null; then echo "yum install -y libaio-devel"
    elif command -v pacman > /dev/null; then echo "pacman -S --noconfirm libaio"
    else echo ""; fi
}

if have_libaio; then
    exit 0
fi
if ! command -v "${CC:-cc}" > /dev/null; then
    echo "libaio: no C compiler (${CC:-cc}); DeepSpeed needs one to build its ops" \
         "(Debian: apt-get install -y build-essential)" >&2
    $require && exit 1
    exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get > /dev/null; then
    echo "libaio: installing libaio-dev (DeepSpeed's async_io op for NVMe offload)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q --no-install-recommends libaio-dev > /dev/null 2>&1 \
        || { apt-get update -q > /dev/null && apt-get install -y -q --no-install-recommends libaio-dev > /dev/null; }
    if have_libaio; then
        echo "libaio: libaio-dev installed"
        exit 0
    fi
    echo "libaio: libaio-dev installed but a test program still does not link with -laio" >&2
    exit 1
fi
command=$(install_command)
{
    echo "libaio: not found. NVMe offload (deepspeed=zero3_nvme) needs it; everything else works without it."
    if [ -n "$command" ]; then
        echo "  Install it with:  sudo $command"
    else
        echo "  Install libaio's development package (headers and libaio.so) with your package manager."
    fi
    echo "  Without root: conda install -c conda-forge libaio, then export CFLAGS=-I\$CONDA_PREFIX/include" \
         "LDFLAGS=-L\$CONDA_PREFIX/lib LD_LIBRARY_PATH=\$CONDA_PREFIX/lib:\$LD_LIBRARY_PATH"
} >&2
$require && exit 1
exit 0
