#!/usr/bin/env bash
# Regenerates producer/kafka/jars.lock from producer/kafka/pom.xml: fetches the runtime
# classpath with Maven into a temporary directory and writes one `<sha256>  <jar>` line per jar,
# sorted by name (the format `sha256sum -c` reads). Run it after changing a version in the pom,
# review the diff, and commit both files together: `ferry broker --kafka` refuses any jar set
# that does not match the lock exactly.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
mvn -B -q -f "$root/producer/kafka/pom.xml" dependency:copy-dependencies \
    -DoutputDirectory="$dir/jars" -DincludeScope=runtime
(cd "$dir/jars" && LC_ALL=C sha256sum -- *.jar | LC_ALL=C sort -k2) >"$root/producer/kafka/jars.lock"
echo "wrote $root/producer/kafka/jars.lock ($(wc -l <"$root/producer/kafka/jars.lock") jars)"
