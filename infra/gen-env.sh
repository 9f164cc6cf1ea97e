#!/bin/sh
# Writes infra/.env from infra/.env.example, replacing every `change-me` value with a fresh random
# one (openssl rand -hex 16). Refuses to overwrite an existing infra/.env. The file is created
# readable by you only.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
src="$here/.env.example"
dst="${1:-$here/.env}"
if [ -e "$dst" ]; then
    echo "$dst exists; not overwriting it (delete it first to regenerate)" >&2
    exit 1
fi
command -v openssl >/dev/null || { echo "openssl is needed" >&2; exit 1; }
umask 077
tmp="$dst.tmp.$$"
while IFS= read -r line || [ -n "$line" ]; do
    case "$line" in
        [A-Za-z_]*=change-me) printf '%s=%s\n' "${line%%=*}" "$(openssl rand -hex 16)" ;;
        *) printf '%s\n' "$line" ;;
    esac
done < "$src" > "$tmp"
mv "$tmp" "$dst"
echo "wrote $dst"
