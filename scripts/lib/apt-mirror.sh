# shellcheck shell=bash
# Sourced by scripts/install-criu.sh and deploy/build-images.sh: the machine's own Debian mirror.
# find_mirror prints the URI of each enabled "deb" source (deb822 *.sources first, then one-line
# *.list files); callers take the first http(s)/file one. No host is ever hard-coded.
find_mirror() {
    local f
    for f in /etc/apt/sources.list.d/*.sources; do
        [[ -f "$f" ]] || continue
        awk '
            function flush() {
                if (types ~ /(^|[ \t])deb([ \t]|$)/ && suites ~ /(^|[ \t])[a-z]+([ \t]|$)/ && uris != "") {
                    split(uris, u, /[ \t]+/); print u[1]; found = 1; exit
                }
                types = ""; suites = ""; uris = ""
            }
            /^[ \t]*$/ { flush(); next }
            /^[ \t]*#/ { next }
            tolower($1) == "types:"  { sub(/^[^:]*:[ \t]*/, ""); types = $0 }
            tolower($1) == "suites:" { sub(/^[^:]*:[ \t]*/, ""); suites = $0 }
            tolower($1) == "uris:"   { sub(/^[^:]*:[ \t]*/, ""); uris = $0 }
            tolower($1) == "enabled:" && tolower($2) == "no" { types = "" }
            END { if (!found) flush() }
        ' "$f"
    done
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [[ -f "$f" ]] || continue
        # deb [options] URI suite components...
        awk '$1 == "deb" {
                i = 2
                if ($i ~ /^\[/) { while ($i !~ /\]$/ && i < NF) i++; i++ }
                if ($(i + 1) ~ /^[a-z]+$/) { print $i; exit }
            }' "$f"
    done
}
