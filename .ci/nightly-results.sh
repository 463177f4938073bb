#!/usr/bin/env bash
# The results branch of the nightly workflow (.github/workflows/nightly.yml): one subcommand per step.
#
#   restore  fetch branch $RESULTS_BRANCH, if it exists, and unpack its results/ into ./results, so that
#            `lossbench nightly` finds the baseline and the history; note what was there.
#   collect  copy what the run added or changed in results/ (its run files), in results/ab/ (nightly --ab's
#            runs) and in results/asv/ (asv's *.json, at any depth), results/baseline.json and comparison.md/.json into $STAGE_DIR, each
#            under its path (results/asv/<machine>/<file>.json to $STAGE_DIR/results/asv/<machine>/):
#            the artifact, and what publish commits.
#   publish  commit the staged results/ files, each at its path under results/, on top of the branch (a
#            first commit when it does not exist yet) and push it. Never forced: a branch that moved
#            meanwhile fails the step.
#
# None of them touches the checkout's HEAD or index, so the run's git_sha does not turn '+dirty'.
# The checkout keeps no credentials (persist-credentials: false): the token reaches git through the
# environment (GIT_CONFIG_*), never in a command line, a URL or a file.
# Env: RESULTS_BRANCH, STAGE_DIR (default $RUNNER_TEMP/nightly), GITHUB_TOKEN, GITHUB_SERVER_URL,
# GITHUB_REPOSITORY, RUNNER_TEMP; publish also NIGHTLY_DEVICE, NIGHTLY_RC, GITHUB_SHA, GITHUB_RUN_ID.
# Needs bash 4.4+ (mapfile -d), git 2.31+ (GIT_CONFIG_COUNT), findutils, coreutils and tar.
# tests/test_workflow.py runs all three against a local bare repository.
set -euo pipefail
export LC_ALL=C

remote="${GITHUB_SERVER_URL:?}/${GITHUB_REPOSITORY:?}.git"
tracking="refs/remotes/origin/${RESULTS_BRANCH:?}"
before="${RUNNER_TEMP:?}/nightly-results.before"
STAGE_DIR="${STAGE_DIR:-$RUNNER_TEMP/nightly}"

with_token() {
    local header
    header="AUTHORIZATION: basic $(printf 'x-access-token:%s' "${GITHUB_TOKEN:?}" | base64 | tr -d '\n')"
    GIT_CONFIG_COUNT=1 GIT_CONFIG_KEY_0=http.extraheader GIT_CONFIG_VALUE_0="$header" git "$@"
}

# sha256 and path of every results file the nightly reads or writes, and of asv's results, sorted.
snapshot() {
    {
        find results -maxdepth 1 -type f \( -name '*.jsonl' -o -name '*.meta.json' -o -name baseline.json \) \
            -exec sha256sum -- {} +
        if [ -d results/asv ]; then
            find results/asv -type f -name '*.json' -exec sha256sum -- {} +
        fi
        # nightly --ab: both sides' rows of each night (results/ab/<run_id>.jsonl and its meta)
        if [ -d results/ab ]; then
            find results/ab -maxdepth 1 -type f \( -name '*.jsonl' -o -name '*.meta.json' \) -exec sha256sum -- {} +
        fi
    } | sort
}

restore() {
    mkdir -p results
    local found=0
    with_token ls-remote --exit-code --heads "$remote" "refs/heads/$RESULTS_BRANCH" >/dev/null || found=$?
    case "$found" in
        0)
            with_token fetch --quiet --no-tags --depth=1 "$remote" "+refs/heads/$RESULTS_BRANCH:$tracking"
            if git cat-file -e "$tracking:results" 2>/dev/null; then
                git archive "$tracking" results | tar -x
            fi
            echo "results/ restored from $RESULTS_BRANCH at $(git rev-parse --short "$tracking")"
            ;;
        2)
            echo "::notice::no branch $RESULTS_BRANCH yet: this run starts the history"
            ;;
        *)
            echo "::error::cannot read branch $RESULTS_BRANCH of $remote (git ls-remote exit $found)"
            return 1
            ;;
    esac
    snapshot >"$before"
}

collect() {
    rm -rf "$STAGE_DIR"
    mkdir -p "$STAGE_DIR/results"
    local path
    if [ -f "$before" ]; then  # no note: restore did not run, nor did the nightly
        snapshot | comm -13 "$before" - | while read -r _ path; do
            mkdir -p -- "$STAGE_DIR/${path%/*}"
            cp -p -- "$path" "$STAGE_DIR/$path"
        done
    fi
    for path in results/baseline.json comparison.md comparison.json; do
        if [ -f "$path" ]; then cp -p -- "$path" "$STAGE_DIR/$path"; fi
    done
    (cd "$STAGE_DIR" && find . -type f | sort)
}

publish() {
    local files=()
    if [ -d "$STAGE_DIR/results" ]; then
        mapfile -d '' files < <(cd "$STAGE_DIR/results" && find . -type f -print0 | sort -z)
    fi
    if [ ${#files[@]} -eq 0 ]; then
        echo "nothing to publish"
        return 0
    fi
    export GIT_INDEX_FILE="$RUNNER_TEMP/nightly-results.index"
    export GIT_AUTHOR_NAME="${GIT_AUTHOR_NAME:-github-actions[bot]}"
    export GIT_AUTHOR_EMAIL="${GIT_AUTHOR_EMAIL:-41898282+github-actions[bot]@users.noreply.github.com}"
    export GIT_COMMITTER_NAME="$GIT_AUTHOR_NAME" GIT_COMMITTER_EMAIL="$GIT_AUTHOR_EMAIL"
    rm -f "$GIT_INDEX_FILE"
    local parent=()
    if git rev-parse -q --verify "$tracking^{commit}" >/dev/null; then
        git read-tree "$tracking"
        parent=(-p "$tracking")
    else
        git read-tree --empty
    fi
    local path tree runs commit
    for path in "${files[@]}"; do
        path="${path#./}"
        git update-index --add --cacheinfo "100644,$(git hash-object -w -- "$STAGE_DIR/results/$path"),results/$path"
    done
    tree=$(git write-tree)
    if [ ${#parent[@]} -gt 0 ] && [ "$tree" = "$(git rev-parse "$tracking^{tree}")" ]; then
        echo "nothing new for $RESULTS_BRANCH"
        return 0
    fi
    runs=$(cd "$STAGE_DIR/results" && find . -maxdepth 1 -name '*.meta.json' | sed 's|^\./||; s|\.meta\.json$||' | sort | paste -sd ' ' -)
    commit=$(git commit-tree "$tree" ${parent[@]+"${parent[@]}"} \
        -m "nightly ${NIGHTLY_DEVICE:?}: ${runs:-no run file} (lossbench nightly exit ${NIGHTLY_RC:?})" \
        -m "Measured at ${GITHUB_SHA:?}: $GITHUB_SERVER_URL/$GITHUB_REPOSITORY/actions/runs/${GITHUB_RUN_ID:?}")
    if ! with_token push --quiet "$remote" "$commit:refs/heads/$RESULTS_BRANCH"; then
        echo "::error::push to $RESULTS_BRANCH refused (did it move during the run?); this run's files are in the artifact"
        return 1
    fi
    git update-ref "$tracking" "$commit"
    echo "$RESULTS_BRANCH is now $(git rev-parse --short "$commit"): $(git diff-tree --root --no-commit-id --name-only -r "$commit" | paste -sd ' ' -)"
}

case "${1:-}" in
    restore | collect | publish) "$1" ;;
    *) echo "usage: $0 restore|collect|publish" >&2; exit 2 ;;
esac
