#!/usr/bin/env bash
# deploy/slurm against a real Slurm: installs Debian's slurm-wlm and munge (as root), starts a
# private one-host cluster (its own munged, slurmctld and one slurmd per fake node, CPU only),
# and runs deploy/slurm/*.sbatch on it with deploy/test/tiny-sweep.yaml (SmolLM2-135M, 6 jobs):
#
#   A. lorasweep.sbatch on 2 nodes; once a job has succeeded, the time-limit signal
#      (`scancel --batch --signal=USR1`, what `#SBATCH --signal=B:USR1@300` sends): the job
#      must stop everything and exit 75, keeping its state;
#   B. the same command again; once it runs, `scancel`: CANCELLED, nothing left running;
#   C. the same command again: it resumes the same sweep, which completes: exit 0, every job
#      succeeded, /healthz answered, the report (or status.json) written;
#   D. a coordinator outside Slurm plus lorasweep-workers.sbatch as a 2-task job array:
#      both tasks end when the sweep has ended, every job succeeded;
#   E. lorasweep.sbatch with --gpus-per-node=2 on fake GPUs (gres on loop devices): one
#      worker per GPU, each shown only its own GPU, every job succeeded.
#
# Exits non-zero on any failure. Idempotent: daemons of an earlier run (found by their pid
# files) are stopped and its directory is wiped first. Everything runs under
# ${LORASWEEP_SLURM_TEST_DIR:-/tmp/lorasweep-slurm-test}; logs stay there for inspection.
# Uses LORASWEEP_BIN if set, else builds target/release/lorasweep.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
ROOT=${LORASWEEP_SLURM_TEST_DIR:-/tmp/lorasweep-slurm-test}
NODES=2
started=$(date +%s)

log() { printf '[slurm test %4ss] %s\n' "$(($(date +%s) - started))" "$*"; }
fail() {
	log "FAILED: $*" >&2
	exit 1
}

[[ $(id -u) -eq 0 ]] || fail "run as root (it installs packages and starts Slurm daemons)"

# --- install ----------------------------------------------------------------------------
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
	log "installing slurm-wlm and munge"
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq
	apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
fi
log "$(slurmd -V)"

if [[ -n ${LORASWEEP_BIN:-} ]]; then
	bin=$LORASWEEP_BIN
else
	(cd "$REPO" && cargo build --release --bin lorasweep)
	bin=${CARGO_TARGET_DIR:-$REPO/target}/release/lorasweep
fi
[[ -x $bin ]] || fail "no lorasweep binary at $bin"

# --- a private cluster ------------------------------------------------------------------
stop_daemons() {
	local pidfile pid
	for pidfile in "$ROOT"/run/*.pid; do
		[[ -f $pidfile ]] || continue
		pid=$(<"$pidfile")
		if [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null; then
			kill -TERM "$pid" 2>/dev/null || true
			for _ in $(seq 50); do
				kill -0 "$pid" 2>/dev/null || break
				sleep 0.2
			done
			kill -KILL "$pid" 2>/dev/null || true
		fi
		rm -f "$pidfile"
	done
}
export SLURM_CONF=$ROOT/etc/slurm.conf
teardown() {
	local status=$?
	if [[ -f $SLURM_CONF ]] && [[ -f $ROOT/run/slurmctld.pid ]]; then
		scancel --user=root 2>/dev/null || true
		sleep 1
	fi
	stop_daemons
	if ((status != 0)); then
		log "logs kept in $ROOT (slurm: $ROOT/log, jobs: $ROOT/jobs, state: $ROOT/state*)"
	fi
	exit "$status"
}
trap teardown EXIT

stop_daemons
# Processes started by an earlier run that was killed before its teardown (daemons, batch
# scripts, slurmstepd, coordinators, workers) carry its SLURM_CONF and the pid of its shell
# in their environment; this run's children carry this shell's pid.
export LORASWEEP_SLURM_TEST_SHELL=$$
for environ in /proc/[0-9]*/environ; do
	pid=${environ#/proc/}
	pid=${pid%/environ}
	[[ $pid == "$$" ]] && continue
	if grep -qzx "SLURM_CONF=$SLURM_CONF" "$environ" 2>/dev/null &&
		grep -qz "^LORASWEEP_SLURM_TEST_SHELL=" "$environ" 2>/dev/null &&
		! grep -qzx "LORASWEEP_SLURM_TEST_SHELL=$$" "$environ" 2>/dev/null; then
		kill -KILL "$pid" 2>/dev/null || true
	fi
done
rm -rf "$ROOT"
mkdir -p "$ROOT"/{etc,run,log,jobs,munge,spool,ctld}
chown munge:munge "$ROOT/munge"
chmod 700 "$ROOT/munge"
head -c 1024 /dev/urandom >"$ROOT/munge/munge.key"
chown munge:munge "$ROOT/munge/munge.key"
chmod 400 "$ROOT/munge/munge.key"
runuser -u munge -- munged --force --socket="$ROOT/munge/munge.socket" \
	--key-file="$ROOT/munge/munge.key" --pid-file="$ROOT/munge/munged.pid" \
	--log-file="$ROOT/munge/munged.log" --seed-file="$ROOT/munge/munged.seed"
for _ in $(seq 50); do [[ -s $ROOT/munge/munged.pid ]] && break; sleep 0.1; done
cp "$ROOT/munge/munged.pid" "$ROOT/run/munged.pid"

host=$(hostname -s)
# Fixed high ports of its own, so a system Slurm on the default ports is left alone.
cat >"$SLURM_CONF" <<EOF
ClusterName=lorasweeptest
GresTypes=gpu
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=16817
SlurmdPort=16818
AuthType=auth/munge
AuthInfo=socket=$ROOT/munge/munge.socket
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$ROOT/ctld
SlurmdSpoolDir=$ROOT/spool/%n
SlurmctldPidFile=$ROOT/run/slurmctld.pid
SlurmdPidFile=$ROOT/run/slurmd-%n.pid
SlurmctldLogFile=$ROOT/log/slurmctld.log
SlurmdLogFile=$ROOT/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$ROOT/log/jobcomp.txt
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
MinJobAge=3600
KillWait=30
NodeName=node[1-$NODES] NodeHostname=$host NodeAddr=127.0.0.1 CPUs=1 RealMemory=4000 Port=[16821-$((16820 + NODES))] Gres=gpu:2 State=UNKNOWN
PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
# Two fake GPUs per node (loop devices stand in for /dev/nvidiaN): Slurm allocates them and
# sets CUDA_VISIBLE_DEVICES and SLURM_GPUS_ON_NODE as on a GPU cluster; the CPU build of
# lorasweep then runs on the CPU, so phase E checks the GPU wiring, not CUDA.
for node in $(seq 1 $NODES); do
	first=$((2 * (node - 1)))
	[[ -e /dev/loop$first && -e /dev/loop$((first + 1)) ]] ||
		fail "no /dev/loop$first and /dev/loop$((first + 1)) to stand in for GPUs"
	echo "NodeName=node$node Name=gpu File=/dev/loop[$first-$((first + 1))]"
done >"$ROOT/etc/gres.conf"
slurmctld -f "$SLURM_CONF"
for node in $(seq 1 $NODES); do slurmd -f "$SLURM_CONF" -N "node$node"; done
for attempt in $(seq 60); do
	idle=$(sinfo -h -N -t idle -o %N 2>/dev/null | sort -u | wc -l)
	((idle == NODES)) && break
	((attempt < 60)) || fail "the $NODES nodes did not become idle: $(sinfo -N 2>&1)"
	sleep 1
done
log "cluster up: $(sinfo -h -o '%P %D nodes %t')"

# The test sweep, with its task file's path made absolute: workers read the path as the job
# gives it, so it must name the same file on every worker.
SWEEP=$ROOT/tiny-sweep.yaml
sed "s|path: tiny-chat.jsonl|path: $REPO/deploy/test/tiny-chat.jsonl|" "$REPO/deploy/test/tiny-sweep.yaml" >"$SWEEP"
grep -q "path: $REPO/deploy/test/tiny-chat.jsonl" "$SWEEP" || fail "could not rewrite the task path of tiny-sweep.yaml"
"$bin" validate "$SWEEP" >/dev/null

# --- helpers ----------------------------------------------------------------------------
job_field() { scontrol show job "$1" -o 2>/dev/null | tr ' ' '\n' | sed -n "s/^$2=//p" | head -n 1; }
wait_job_done() { # JOB SECONDS
	local state
	for _ in $(seq "$2"); do
		state=$(job_field "$1" JobState)
		case $state in
		PENDING | CONFIGURING | RUNNING | COMPLETING | SUSPENDED | "") sleep 1 ;;
		*) return 0 ;;
		esac
	done
	fail "job $1 still $(job_field "$1" JobState) after $2 s; output: $(tail -n 20 "$ROOT"/jobs/*"$1"*.out 2>/dev/null)"
}
expect_job() { # JOB STATE EXITCODE
	local state exit_code
	state=$(job_field "$1" JobState)
	exit_code=$(job_field "$1" ExitCode)
	if [[ $state != "$2" || $exit_code != "$3" ]]; then
		cat "$ROOT"/jobs/*"$1"*.out >&2 2>/dev/null || true
		fail "job $1: expected $2 with exit code $3, got $state with $exit_code"
	fi
	log "job $1: $state, exit code $exit_code (as expected)"
}
# Reads a status JSON file: prints "SUCCEEDED TOTAL ENDED".
summary() {
	python3 -c '
import json, sys
status = json.load(open(sys.argv[1]))
counts = status["counts"]
print(counts.get("succeeded", 0), sum(counts.values()), str(status["ended"]).lower())
' "$1"
}
succeeded_now() { [[ -s $1 ]] && summary "$1" | cut -d' ' -f1 || echo 0; }
no_processes_of() { # JOB
	local left
	left=$(pgrep -f "slurm-$1-" || true)
	[[ -z $left ]] || fail "workers of job $1 still running: $left"
}
assert_all_succeeded() { # STATUS_JSON
	local line
	line=$(summary "$1")
	read -r ok total ended <<<"$line"
	[[ $ended == true && $ok -eq $total && $total -eq 6 ]] ||
		fail "expected 6 of 6 jobs succeeded in $1, got succeeded/total/ended = $line"
	log "status: $ok of $total jobs succeeded"
}

STATE=$ROOT/state
submit_allocation() {
	sbatch --parsable --nodes=$NODES --output="$ROOT/jobs/lorasweep-%j.out" \
		--export=ALL,LORASWEEP_BIN="$bin",LORASWEEP_FETCH=smollm2-135m,LORASWEEP_METRICS_PORT=16890,LORASWEEP_POLL_SECS=2 \
		"$REPO/deploy/slurm/lorasweep.sbatch" "$SWEEP" "$STATE"
}

# --- A: the time-limit signal -------------------------------------------------------------
job_a=$(submit_allocation)
log "A: job $job_a submitted; waiting for its first finished job"
for attempt in $(seq 300); do
	(($(succeeded_now "$STATE/status.json") >= 1)) && break
	[[ $(job_field "$job_a" JobState) == RUNNING || $(job_field "$job_a" JobState) == PENDING ]] ||
		fail "job $job_a ended early: $(cat "$ROOT/jobs/lorasweep-$job_a.out")"
	((attempt < 300)) || fail "no job of the sweep succeeded within 300 s"
	sleep 1
done
sweep_id=$(<"$STATE/sweep-id")
coordinator_pid=$(<"$STATE/coordinator.pid")
log "A: sweep $sweep_id has a finished job; sending the time-limit signal"
scancel --batch --signal=USR1 "$job_a"
wait_job_done "$job_a" 120
expect_job "$job_a" FAILED 75:0
! kill -0 "$coordinator_pid" 2>/dev/null || fail "A: the coordinator (pid $coordinator_pid) outlived its job"
no_processes_of "$job_a"
grep -q "received SIGUSR1" "$ROOT/jobs/lorasweep-$job_a.out" || fail "A: no SIGUSR1 line in the job output"
grep -q "healthz ok on port 16890" "$ROOT/jobs/lorasweep-$job_a.out" || fail "A: /healthz was not checked"

# --- B: scancel ---------------------------------------------------------------------------
job_b=$(submit_allocation)
log "B: job $job_b submitted; cancelling it once it has resumed the sweep"
for attempt in $(seq 120); do
	grep -q "^\[lorasweep.sbatch [0-9:]*\] sweep $sweep_id\$" "$ROOT/jobs/lorasweep-$job_b.out" 2>/dev/null && break
	((attempt < 120)) || fail "B: job $job_b did not resume sweep $sweep_id: $(cat "$ROOT/jobs/lorasweep-$job_b.out" 2>/dev/null)"
	sleep 1
done
grep -q "resuming sweep $sweep_id" "$ROOT/jobs/lorasweep-$job_b.out" || fail "B: submit did not resume sweep $sweep_id"
coordinator_pid=$(<"$STATE/coordinator.pid")
sleep 3
scancel "$job_b"
wait_job_done "$job_b" 120
[[ $(job_field "$job_b" JobState) == CANCELLED ]] || fail "B: job $job_b is $(job_field "$job_b" JobState), not CANCELLED"
log "job $job_b: CANCELLED (as expected)"
for _ in $(seq 30); do kill -0 "$coordinator_pid" 2>/dev/null || break; sleep 1; done
! kill -0 "$coordinator_pid" 2>/dev/null || fail "B: the coordinator (pid $coordinator_pid) outlived its job"
no_processes_of "$job_b"

# --- C: resume to the end -----------------------------------------------------------------
job_c=$(submit_allocation)
log "C: job $job_c submitted; waiting for the sweep to end"
wait_job_done "$job_c" 420
expect_job "$job_c" COMPLETED 0:0
out_c=$ROOT/jobs/lorasweep-$job_c.out
grep -q "resuming sweep $sweep_id" "$out_c" || fail "C: submit did not resume sweep $sweep_id"
grep -q "healthz ok on port 16890" "$out_c" || fail "C: /healthz was not checked"
grep -q "every job succeeded" "$out_c" || fail "C: no success line"
assert_all_succeeded "$STATE/status.json"
if "$bin" report --help >/dev/null 2>&1; then
	[[ -n $(ls -A "$STATE/report" 2>/dev/null) ]] || fail "C: the report verb wrote nothing to $STATE/report"
	log "report: $(ls "$STATE/report" | tr '\n' ' ')"
else
	grep -q "status.json is the report" "$out_c" || fail "C: no report and no note about it"
	log "report: no report verb in this binary; status.json stands in"
fi
no_processes_of "$job_c"

# --- D: coordinator outside Slurm, workers from a job array --------------------------------
EXT=$ROOT/external
mkdir -p "$EXT"
(umask 077 && od -An -N32 -tx1 /dev/urandom | tr -d ' \n' >"$EXT/token")
"$bin" coordinator --listen 0.0.0.0:16870 --db "$EXT/state.db" --token-file "$EXT/token" \
	--addr-file "$EXT/coordinator.addr" >"$ROOT/log/external-coordinator.log" 2>&1 &
echo $! >"$ROOT/run/external-coordinator.pid"
for _ in $(seq 100); do [[ -s $EXT/coordinator.addr ]] && break; sleep 0.1; done
[[ -s $EXT/coordinator.addr ]] || fail "D: the external coordinator did not start: $(cat "$ROOT/log/external-coordinator.log")"
export LORASWEEP_COORDINATOR=http://127.0.0.1:16870
external_sweep=$("$bin" submit --resume --token-file "$EXT/token" "$SWEEP")
job_d=$(LORASWEEP_TOKEN_FILE=$EXT/token LORASWEEP_SWEEP_ID=$external_sweep LORASWEEP_BIN=$bin LORASWEEP_POLL_SECS=2 \
	sbatch --parsable --array=0-1 --nodes=1 --output="$ROOT/jobs/workers-%A_%a.out" \
	"$REPO/deploy/slurm/lorasweep-workers.sbatch")
log "D: sweep $external_sweep on an external coordinator; worker array $job_d submitted"
for task in 0 1; do
	wait_job_done "${job_d}_$task" 420
	expect_job "${job_d}_$task" COMPLETED 0:0
done
"$bin" status "$external_sweep" --token-file "$EXT/token" --format json >"$EXT/status.json"
assert_all_succeeded "$EXT/status.json"
# Each task stops its own workers once it sees the sweep end; stopping one task's workers must
# not stop another's (the last task's job id is the array's id, and scancel of it is every task).
for task in 0 1; do
	out_d=$ROOT/jobs/workers-${job_d}_$task.out
	grep -q "sweep $external_sweep has ended$" "$out_d" || fail "D: array task $task did not see the sweep end itself"
done

"$bin" cancel "$external_sweep" --token-file "$EXT/token" 2>/dev/null || true
kill -TERM "$(<"$ROOT/run/external-coordinator.pid")"

# --- E: GPUs: one worker per (fake) GPU -----------------------------------------------------
STATE_GPU=$ROOT/state-gpu
job_e=$(sbatch --parsable --nodes=1 --gpus-per-node=2 --output="$ROOT/jobs/lorasweep-%j.out" \
	--export=ALL,LORASWEEP_BIN="$bin",LORASWEEP_POLL_SECS=2 \
	"$REPO/deploy/slurm/lorasweep.sbatch" "$SWEEP" "$STATE_GPU")
log "E: job $job_e submitted on 1 node with 2 GPUs"
wait_job_done "$job_e" 420
expect_job "$job_e" COMPLETED 0:0
grep -q "2 GPU worker(s) per node" "$ROOT/jobs/lorasweep-$job_e.out" || fail "E: the job did not see 2 GPUs per node"
assert_all_succeeded "$STATE_GPU/status.json"
gpus_used=$(cat "$STATE_GPU"/logs/worker-"$job_e"-*.log | sed -n 's/^worker \(.*\) on GPU \(.*\)$/\1=\2/p' | sort | tr '\n' ' ')
[[ $gpus_used == "node1-0=0 node1-1=1 " ]] || fail "E: expected workers node1-0 on GPU 0 and node1-1 on GPU 1, got '$gpus_used'"
log "E: workers and their GPUs: $gpus_used"

log "PASSED: the allocation script stopped on the time-limit signal and on scancel, resumed" \
	"and finished; the workers-only array finished a sweep of an outside coordinator; one" \
	"worker ran per GPU"
