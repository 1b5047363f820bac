# Sourced by scripts/build-lambda and scripts/test. check_bootstrap NAME FILE: checks that FILE
# is what the provided.al2023 runtime (x86_64) can run, an x86-64 ELF executable whose newest
# required glibc symbol is no newer than al2023's, and prints one line saying so or what is
# wrong; returns non-zero if it is not.

AL2023_GLIBC=2.34

check_bootstrap() {
  local name=$1 bootstrap=$2 kind glibc newest size
  if [ ! -f "$bootstrap" ]; then
    echo "$name: MISSING $bootstrap"; return 1
  fi
  kind=$(od -An -tx1 -N20 "$bootstrap" | tr -d ' \n')
  # ELF magic, 64-bit, little-endian; e_machine 0x3e = x86-64.
  case "$kind" in 7f454c46020101*) ;; *) echo "$name: not a 64-bit little-endian ELF"; return 1 ;; esac
  [ "${kind:36:4}" = "3e00" ] || { echo "$name: not x86-64"; return 1; }
  glibc=$(grep -ao 'GLIBC_2\.[0-9]*' "$bootstrap" | sort -t. -k2 -n | tail -1 | cut -d_ -f2)
  [ -n "$glibc" ] || { echo "$name: no glibc symbol version found (not a dynamically linked glibc executable)"; return 1; }
  newest=$(printf '%s\n%s\n' "$glibc" "$AL2023_GLIBC" | sort -V | tail -1)
  size=$(du -h "$bootstrap" | cut -f1)
  if [ "$newest" != "$AL2023_GLIBC" ]; then
    echo "$name: needs glibc $glibc, newer than al2023's $AL2023_GLIBC"; return 1
  fi
  echo "$name: x86-64 ELF, needs glibc <= $glibc (al2023 has $AL2023_GLIBC), $size"
}
