/*
 * pvc.cluster: the lockstep migration protocol and the fence-and-recover protocol as a
 * Promela model, checked with spin (`make test-model`, scripts/check-model.sh).
 *
 * One VM, three nodes, ZooKeeper, each node's libvirt and power, and a fault-injecting
 * environment. Every label S*, T*, R*, K*, F*, O*, E* below names a step that
 * docs/migration-protocol.md ("The model") maps to the code that performs it.
 *
 * What is atomic here, and why that is faithful:
 *  - one ZooKeeper transaction (a multi with version checks) is one atomic step: its guard is
 *    the version check, evaluated on the current state as ZooKeeper evaluates it;
 *  - a daemon's decision and the version-checked write it leads to are one atomic step: the
 *    write checks the versions of everything the decision read (the record, `node`, the
 *    node's own daemon state), so a decision on a stale view is a write that fails, which is
 *    the same as not deciding (a failed write changes nothing, and a later pass re-decides);
 *  - a libvirt action (create, shutdown, destroy, the start of a live migration job) is a
 *    step of its own, taken after the write that allowed it: a daemon may be killed, lose its
 *    session or be partitioned between the two, and the action still happens if the process
 *    lives (a process stalled past its session is the hardest case, and is allowed);
 *  - timeouts are nondeterministic: a step deadline can pass at any moment (a loaded machine).
 * Bounds (faults, requests) are macros; `make test-model` uses the defaults below.
 */

#define N       3          /* nodes 0..2 */
#define NONE    3

/* libvirt's state of the VM on one node */
#define OFF     0
#define RUNNING 1
#define PAUSED  2          /* the incoming copy of a live migration (never runs by itself) */
#define UNKNOWN 3          /* that node's libvirtd cannot be asked */

/* the migration record's step (S_NONE: no record: "done" and "aborted" delete it) */
#define S_NONE  0
#define S_REQ   1
#define S_PREP  2
#define S_XING  3          /* transferring */
#define S_XED   4          /* transferred */

/* method_used */
#define MU_NONE 0
#define MU_LIVE 1
#define MU_SHUT 2          /* shutdown, or offline (nothing ran on the source) */

/* the requested method: default (live, on failure shutdown) or live only */
#define RM_DEFAULT 0
#define RM_LIVE    1

/* a node's daemon_state */
#define D_RUN     0
#define D_DEAD    1
#define D_FENCED  2
#define D_FFAILED 3        /* fence-failed */
#define D_FENCING 4        /* a fence actor is powering the node off */

/* a daemon's VM worker: the step it is in between a write and the libvirt action it allows */
#define W_IDLE      0
#define W_START     1      /* reconciler decided START: libvirt create next */
#define W_CLAIMED   2      /* target wrote its start claim: libvirt create next */
#define W_STARTED   3      /* target created the VM: write `done` next */
#define W_LIVE      4      /* source waits for libvirt's live migration job */
#define W_SHUT      5      /* source shuts the VM down for a shutdown migration */
#define W_SHUTDONE  6      /* source: VM off, write `transferred` next */
#define W_DESTROY   7      /* a stray copy: libvirt destroy next */

/* a daemon's fence actor */
#define F_IDLE      0
#define F_LOCKED    1      /* holds the lock of node fx, read it `dead` at version fver */
#define F_OFF       2      /* the BMC confirmed power off */
#define F_FAILED    3      /* the fence failed or could not be confirmed */
#define F_RECOVER   4      /* wrote `fenced`: recovers the node's VMs */

#ifndef FAULTS
#define FAULTS 2           /* daemon crashes, session losses, partitions, power losses, quorum losses */
#endif
#ifndef POWER_LOSSES
#define POWER_LOSSES 1
#endif
#ifndef BMC_FAILURES
#define BMC_FAILURES 1
#endif
#ifndef REQUESTS
#define REQUESTS 1         /* operator migration requests */
#endif
#ifndef RETARGETS
#define RETARGETS 1        /* `node` changed under a migration */
#endif
#ifndef REPAIRS
#define REPAIRS 1          /* a powered-off node powered on again by an operator */
#endif

/* ---- ZooKeeper ------------------------------------------------------------------------ */
byte vnode = 0;                 /* /domains/<uuid>/node; the VM's state is `start` throughout */
byte rstep = S_NONE;            /* /domains/<uuid>/migration */
byte rsrc = NONE;
byte rtgt = NONE;
byte rmeth = RM_DEFAULT;
byte rmu = MU_NONE;
bool rclaim = false;            /* starting_on = target */
byte own[N];                    /* /nodes/<n>/daemon_state, written by n itself (D_RUN initially), or
                                   D_FENCED by an operator's confirm_down */
byte nver[N];                   /* its version */
/* A peer's verdict about n (its own /nodes/<peer>/fences/<n>, naming the version of n's state it
 * judged): one slot per judged node, since the strongest verdict decides and, in the protocol,
 * each new verdict about a version is stronger than the last (dead, fencing, fenced/fence-failed) */
byte vst[N];                    /* D_RUN: none */
byte vver[N];                   /* the version of own[n] it judged */
/* /nodes/<n>/claims/<version>: create-once; only the claim of the current version matters (a
 * node's registration deletes the others, and a claim of an older version decides nothing) */
bool clset[N];
byte clv[N];
bool sess[N];                   /* node n's daemon has a live session (its `alive` znode exists) */
bool quorum = true;
byte flock[N];                  /* holder of the fence lock of node x, or NONE */

/* ---- the physical world ------------------------------------------------------------------ */
bool power[N];
byte lv[N];                     /* libvirt's state of the VM on node n: OFF, RUNNING or PAUSED */
bool part[N];                   /* node n cut off from ZooKeeper and from its peers (not its BMC) */
bool dup[N];                    /* node n's daemon process runs */
bool booted[N];                 /* ... and has registered (`init`, then `run`) */
bool kpend[N];                  /* its keepalive read `dead`/`fence-failed`: writes `run` next */
byte kver[N];                   /* ... at this version of its own state */
byte kst[N];                    /* ... which it read as this */
bool late[N];                   /* its keepalives are late (a loaded host): its peers may judge it dead
                                   while it works on, its session alive */
bool job = false;               /* libvirt's live migration job, driven by the source's libvirtd */
byte jsrc = NONE;
byte jtgt = NONE;
byte jres = 0;                  /* 0 none yet, 1 succeeded, 2 failed: what migrate() returns */

/* ---- the daemons' memory (lost when the process dies) -------------------------------------- */
byte wpc[N];
byte fpc[N];
byte fx[N];                     /* the node a fence actor acts on */
byte fver[N];                   /* the version of the daemon state it wrote (`fencing`, `fenced`) */

/* ---- bounds ------------------------------------------------------------------------------- */
byte faults = FAULTS;
byte powerlosses = POWER_LOSSES;
byte bmcfail = BMC_FAILURES;
byte requests = REQUESTS;
byte retargets = RETARGETS;
byte repairs = REPAIRS;

#define zk(n)       (dup[n] && power[n] && sess[n] && quorum && !part[n])
/* A node's state as everyone reads it (_records.node_state): its own, unless a verdict names
 * the version its own state has now (a fence verdict is only written with the claim of it). */
#define est(x)      ((vst[x] != D_RUN && vver[x] == nver[x] && own[x] != D_FENCED) -> vst[x] : own[x])
#define claimed(x, v) (clset[x] && clv[x] == (v))
/* No guard on a node's own daemon state when it starts a VM (nor in the code): a daemon that
 * starts again registers first (K1, rule D1), which fails every recovery still to come (D4). */

/* D6: the source's transferring write checks that the target is still `run` (its own state's
 * version and its claims container's, whose version every verdict changes) */
#ifdef BROKEN_NO_D6
#define tgt_run true
#else
#define tgt_run (est(rtgt) == D_RUN)
#endif
#define active(s)   ((s) == RUNNING || (s) == PAUSED)
#define running_on(n) (lv[n] == RUNNING)

/* libvirt on node p as node n sees it (MigrationAgent.state_on / peer_state): its own libvirt,
 * a peer's libvirtd over the network, or nothing. A node confirmed powered off by its fence
 * (`fenced`) is known to run nothing (rule D2). */
#define lvq(n, p)   ((p) == (n) -> lv[p] : \
                     (est(p) == D_FENCED -> OFF : \
                      ((part[n] || part[p] || !power[p]) -> UNKNOWN : lv[p])))

/* D4: a recovery transaction checks the fenced node's daemon state version as well as `node`
 * (a node whose daemon starts again registers first, so nothing still assigned to it is moved
 * away while it may start it) */
#ifdef BROKEN_RECOVERY_NO_STATE_CHECK
#define rec_checks(x) true          /* broken on purpose: the state was read `fenced` earlier only */
#else
#define rec_checks(x) (est(x) == D_FENCED && nver[x] == fver[n])
#endif

#define end_record() rstep = S_NONE; rsrc = NONE; rtgt = NONE; rmeth = RM_DEFAULT; rmu = MU_NONE; rclaim = false
#define abort_to(s)  vnode = (s); end_record()

/* The safety property I1: the VM never runs on two nodes at once. */
#define two_running ((lv[0] == RUNNING && lv[1] == RUNNING) || (lv[0] == RUNNING && lv[2] == RUNNING) || \
                     (lv[1] == RUNNING && lv[2] == RUNNING))
#define runs_somewhere (lv[0] == RUNNING || lv[1] == RUNNING || lv[2] == RUNNING)

/* A node's power goes off: every process on it dies, its libvirt forgets the VM, its session
 * ends (its ephemeral `alive` and lock znodes go), a live migration job through it fails. */
inline power_off(x) {
    power[x] = false; dup[x] = false; booted[x] = false; sess[x] = false;
    lv[x] = OFF; wpc[x] = W_IDLE; fpc[x] = F_IDLE; fx[x] = NONE; fver[x] = 0; kpend[x] = false; kver[x] = 0; kst[x] = 0;
    late[x] = false; release_locks(x);
    if
    :: job && (jsrc == x || jtgt == x) -> lv[jtgt] = OFF; job = false; jres = 2
    :: else -> skip
    fi
}

inline release_locks(x) {
    if :: flock[0] == x -> flock[0] = NONE :: else -> skip fi;
    if :: flock[1] == x -> flock[1] = NONE :: else -> skip fi;
    if :: flock[2] == x -> flock[2] = NONE :: else -> skip fi
}

/* Ground truth (MigrationAgent.resolve), as node n decides it: one atomic decision and its
 * version-checked write. Only the outcomes that change something are steps; "wait" is no step
 * (a later deadline brings the check again). R1..R7 name the rows of the resolution table. */
#define res_src   lvq(n, rsrc)
#define res_tgt   lvq(n, rtgt)
#define res_known (res_src != UNKNOWN && res_tgt != UNKNOWN)
#define res_shut  (rmu == MU_SHUT && (rstep == S_XING || rstep == S_XED))
/* Off on both sides after a shutdown migration, a source (or a third party) waits while the
 * target may start the VM: the target is alive and the record at `transferring` (it is handed
 * on: R5), or the target has claimed the start. Without a claim, an alive target that let a
 * whole step timeout pass gets the VM taken back (R6: the abort and a claim are both checked
 * against the record's version, so they exclude each other). */
#ifdef BROKEN_PEER_ALIVE
/* The rule node_daemon/migration.py had before D7: a claim is waited for only while the
 * target's `alive` znode exists. */
#define claim_holds (sess[rtgt])
#else
/* Rule D7: a target that claimed the start may still be creating the VM (a process stalled past
 * its session): only its fence makes taking the VM back safe. */
#define claim_holds (sess[rtgt] || est(rtgt) != D_FENCED)
#endif
#define tgt_may_start ((sess[rtgt] && rstep == S_XING) || (rclaim && claim_holds))

inline resolve(n) {
    if
    :: res_known && active(res_src) && res_tgt == RUNNING && n == rsrc ->   /* R1: both run: keep the target's */
        wpc[n] = W_DESTROY; end_record()
    :: res_known && active(res_src) && res_tgt == OFF ->                    /* R2: never left the source */
        abort_to(rsrc)
    :: res_known && !active(res_src) && res_tgt == RUNNING ->               /* R3: transfer completed */
        end_record()
    :: res_known && !active(res_src) && res_tgt == OFF && res_shut && n == rtgt ->   /* R4: target claims the start */
        rclaim = true; wpc[n] = W_CLAIMED
    :: res_known && !active(res_src) && res_tgt == OFF && res_shut && n != rtgt &&
       sess[rtgt] && rstep == S_XING ->                                     /* R5: hand it to the target */
        rstep = S_XED
    :: res_known && !active(res_src) && res_tgt == OFF && !(res_shut && (n == rtgt || tgt_may_start)) ->
        abort_to(rsrc)                                                      /* R6: back to the source */
    fi
}
/* Whether resolve(n) has a step to take (a source and a paused incoming copy: libvirt still
 * transfers; both running, seen from the target: the source stops its copy; a claimed start
 * the target may still make: wait for it or for its fence). */
#define can_resolve(n) (res_known && ( \
      (active(res_src) && res_tgt == RUNNING && n == rsrc) \
   || (active(res_src) && res_tgt == OFF) \
   || (!active(res_src) && res_tgt == RUNNING) \
   || (!active(res_src) && res_tgt == OFF && res_shut && n == rtgt) \
   || (!active(res_src) && res_tgt == OFF && res_shut && n != rtgt && sess[rtgt] && rstep == S_XING) \
   || (!active(res_src) && res_tgt == OFF && !(res_shut && (n == rtgt || tgt_may_start)))))

/* ======================================================================================== */
/* A node's daemon: the VM worker (reconciler + migration agent) and the keepalive.          */
proctype Daemon(byte n)
{
    byte y;
end_idle:
    do
    /* ---- keepalive ---------------------------------------------------------------------- */
    :: atomic { zk(n) && !booted[n] ->                                       /* K1: register, first keepalive */
        own[n] = D_RUN; nver[n]++; clset[n] = false; booted[n] = true; late[n] = false }       /* (`init` then `run`, from any state; */
                                                                              /*  the claims of older versions deleted) */
    :: atomic { zk(n) && booted[n] && !kpend[n] && (est(n) == D_DEAD || est(n) == D_FFAILED) ->
        kpend[n] = true; kver[n] = nver[n]; kst[n] = est(n) }                 /* K2: reads `dead`/`fence-failed` ... */
    :: atomic { kpend[n] && dup[n] ->                                         /* ... and writes `run` at that version, */
        kpend[n] = false;                                                     /* claiming it unless claimed (D8) */
        if
#ifdef BROKEN_KEEPALIVE_NO_CLAIM
        :: zk(n) -> own[n] = D_RUN; nver[n]++; late[n] = false              /* broken on purpose: the rule before D8 */
#else
        :: zk(n) && nver[n] == kver[n] && !claimed(n, kver[n]) -> clset[n] = true; clv[n] = kver[n];
           own[n] = D_RUN; nver[n]++; late[n] = false
        :: zk(n) && nver[n] == kver[n] && claimed(n, kver[n]) && kst[n] == D_FFAILED -> own[n] = D_RUN; nver[n]++;
           late[n] = false
#endif
        :: else -> skip
        fi }
    :: atomic { zk(n) && booted[n] && est(n) == D_RUN && est((n + 1) % N) == D_RUN && (!zk((n + 1) % N) || late[(n + 1) % N]) ->
        vst[(n + 1) % N] = D_DEAD; vver[(n + 1) % N] = nver[(n + 1) % N] }   /* K3: a stale peer: verdict `dead` */
    :: atomic { zk(n) && booted[n] && est(n) == D_RUN && est((n + 2) % N) == D_RUN && (!zk((n + 2) % N) || late[(n + 2) % N]) ->
        vst[(n + 2) % N] = D_DEAD; vver[(n + 2) % N] = nver[(n + 2) % N] }

    /* ---- the reconciler: no migration record -------------------------------------------- */
    :: atomic { zk(n) && booted[n] && wpc[n] == W_IDLE && rstep == S_NONE && vnode == n &&
                   !active(lv[n]) ->                                     /* C1: decide START */
        wpc[n] = W_START }
    :: atomic { dup[n] && wpc[n] == W_START ->                                /* C2: libvirt create */
        lv[n] = RUNNING; wpc[n] = W_IDLE }
    :: atomic { zk(n) && booted[n] && wpc[n] == W_IDLE && rstep == S_NONE && vnode != n &&
                   active(lv[n]) && lvq(n, vnode) == RUNNING ->               /* C3: rehome, a copy there */
        wpc[n] = W_DESTROY }
    :: atomic { zk(n) && booted[n] && wpc[n] == W_IDLE && rstep == S_NONE && vnode != n &&
                   lv[n] == RUNNING && lvq(n, vnode) == OFF && est(vnode) == D_RUN ->   /* C4: rehome: move */
        rstep = S_REQ; rsrc = n; rtgt = vnode; rmeth = RM_DEFAULT }
    :: atomic { zk(n) && booted[n] && wpc[n] == W_IDLE && rstep != S_NONE && rsrc != n && rtgt != n &&
                   active(lv[n]) ->                                           /* C5: a stray copy */
        wpc[n] = W_DESTROY }
    :: atomic { dup[n] && wpc[n] == W_DESTROY ->                              /* C6: libvirt destroy */
        lv[n] = OFF; wpc[n] = W_IDLE }

    /* ---- the migration agent: source --------------------------------------------------- */
    :: atomic { zk(n) && booted[n] && wpc[n] == W_IDLE && rstep == S_REQ && rsrc == n ->   /* S1: target did not prepare */
        abort_to(n) }
    :: atomic { zk(n) && booted[n] && wpc[n] == W_IDLE && rstep == S_PREP && rsrc == n && vnode != rtgt ->
        abort_to(n) }                                                         /* S2: target changed */
    :: atomic { zk(n) && booted[n] && wpc[n] == W_IDLE && rstep == S_PREP && rsrc == n && vnode == rtgt &&
                !tgt_run ->                                                   /* S2b: target not `run` (D6) */
        abort_to(n) }
    :: atomic { zk(n) && booted[n] && wpc[n] == W_IDLE && rstep == S_PREP && rsrc == n && vnode == rtgt &&
                tgt_run && !active(lv[n]) ->                      /* S3: offline: nothing runs here */
        rstep = S_XED; rmu = MU_SHUT }
    :: atomic { zk(n) && booted[n] && wpc[n] == W_IDLE && rstep == S_PREP && rsrc == n && vnode == rtgt &&
                tgt_run && lv[n] == RUNNING ->                    /* S4: transferring (live) */
        rstep = S_XING; rmu = MU_LIVE;
        /* libvirt's p2p job starts (timing assumption A1, see the docs) */
        if
        :: power[rtgt] && !part[rtgt] && !part[n] -> job = true; jsrc = n; jtgt = rtgt; jres = 0; lv[rtgt] = PAUSED
        :: else -> jres = 2
        fi;
        wpc[n] = W_LIVE }
    :: atomic { dup[n] && wpc[n] == W_LIVE && jres == 1 ->                    /* S5: live done: transferred */
        jres = 0; wpc[n] = W_IDLE;
        if :: zk(n) && rstep == S_XING && rsrc == n -> rstep = S_XED :: else -> skip fi }
    :: atomic { dup[n] && wpc[n] == W_LIVE && jres == 2 ->                    /* S6: live failed */
        jres = 0; wpc[n] = W_IDLE;
        if
        :: zk(n) && rstep == S_XING && rsrc == n && rmu == MU_LIVE && rmeth == RM_DEFAULT ->
            rmu = MU_SHUT; wpc[n] = W_SHUT                                    /* S6a: fall back to shutdown */
        :: zk(n) && rstep == S_XING && rsrc == n && rmu == MU_LIVE && lv[n] == RUNNING ->
            abort_to(n)   /* S6b: method live, or libvirt's connection to the target failed: abort */
        :: else -> skip                                                       /* the write fails: resolve later */
        fi }
    :: atomic { dup[n] && wpc[n] == W_SHUT ->                                 /* S7: shutdown (forced after timeout) */
        lv[n] = OFF; wpc[n] = W_SHUTDONE }
    :: atomic { dup[n] && wpc[n] == W_SHUTDONE ->                             /* S8: transferred */
        wpc[n] = W_IDLE;
        if :: zk(n) && rstep == S_XING && rsrc == n && rmu == MU_SHUT -> rstep = S_XED :: else -> skip fi }
    :: atomic { zk(n) && booted[n] && wpc[n] == W_IDLE && rsrc == n &&
                   (rstep == S_XING || rstep == S_XED) && can_resolve(n) ->   /* S9: restart or timeout: resolve */
        resolve(n) }

    /* ---- the migration agent: target --------------------------------------------------- */
    :: atomic { zk(n) && booted[n] && wpc[n] == W_IDLE && rstep == S_REQ && rtgt == n &&
                   est(n) == D_RUN && !active(lv[n]) ->                       /* T1: prepared */
        rstep = S_PREP }
    :: atomic { zk(n) && booted[n] && wpc[n] == W_IDLE && rstep == S_REQ && rtgt == n &&
                   est(n) != D_RUN ->                                         /* T2: not ready: abort */
        abort_to(rsrc) }
    :: atomic { zk(n) && booted[n] && wpc[n] == W_IDLE && rtgt == n && lv[n] == RUNNING &&
                   ((rstep == S_XING && rmu == MU_LIVE) || rstep == S_XED) -> /* T3: runs here: done */
        end_record() }
    :: atomic { zk(n) && booted[n] && wpc[n] == W_IDLE && rtgt == n && rstep == S_XED && rmu == MU_SHUT &&
                   !active(lv[n]) ->                                          /* T4: claim the start */
        rclaim = true; wpc[n] = W_CLAIMED }
    :: atomic { dup[n] && wpc[n] == W_CLAIMED ->                              /* T5: libvirt create */
        if
        :: lv[n] = RUNNING; wpc[n] = W_STARTED
        :: wpc[n] = W_IDLE;                                                   /* T5b: create failed: abort */
           if :: zk(n) && rtgt == n && rclaim -> abort_to(rsrc) :: else -> skip fi
        fi }
    :: atomic { dup[n] && wpc[n] == W_STARTED ->                              /* T6: done */
        wpc[n] = W_IDLE;
        if :: zk(n) && rtgt == n && rclaim -> end_record() :: else -> skip fi }
    :: atomic { zk(n) && booted[n] && wpc[n] == W_IDLE && rtgt == n &&
                   (rstep == S_PREP || rstep == S_XING || (rstep == S_XED && rmu == MU_LIVE && lv[n] != RUNNING)) &&
                   can_resolve(n) ->                                          /* T7: timeout or restart: resolve */
        resolve(n) }
    :: atomic { zk(n) && booted[n] && wpc[n] == W_IDLE && rstep == S_REQ && rtgt == n && active(lv[n]) &&
                   can_resolve(n) ->                                          /* T8: already runs here */
        resolve(n) }
    od
}

/* ======================================================================================== */
/* A node's fence actor: acts on one dead peer at a time, under that peer's lock.             */
proctype Fencer(byte n)
{
    byte x;
end_idle:
    do
    /* F1: a `dead` node (or `fencing`: an actor died while fencing it): take its lock, then
     * claim the version of its state read under the lock (unless an earlier actor claimed it)
     * and write the verdict `fencing`, checked against that version (D8: the node's keepalive
     * claims the same version to come back: one of the two) */
    :: atomic { zk(n) && booted[n] && est(n) == D_RUN && fpc[n] == F_IDLE &&
                   (est((n + 1) % N) == D_DEAD || est((n + 1) % N) == D_FENCING) && flock[(n + 1) % N] == NONE ->
        fx[n] = (n + 1) % N; flock[fx[n]] = n; clset[fx[n]] = true; clv[fx[n]] = nver[fx[n]];
        vst[fx[n]] = D_FENCING; vver[fx[n]] = nver[fx[n]]; fver[n] = nver[fx[n]];
        fpc[n] = F_LOCKED }
    :: atomic { zk(n) && booted[n] && est(n) == D_RUN && fpc[n] == F_IDLE &&
                   (est((n + 2) % N) == D_DEAD || est((n + 2) % N) == D_FENCING) && flock[(n + 2) % N] == NONE ->
        fx[n] = (n + 2) % N; flock[fx[n]] = n; clset[fx[n]] = true; clv[fx[n]] = nver[fx[n]];
        vst[fx[n]] = D_FENCING; vver[fx[n]] = nver[fx[n]]; fver[n] = nver[fx[n]];
        fpc[n] = F_LOCKED }
    :: atomic { fpc[n] == F_LOCKED && dup[n] ->                                 /* F2: power off through the BMC */
        if
#ifdef BROKEN_NO_FENCE
        :: fpc[n] = F_OFF                   /* broken on purpose: "recovered" without powering off */
#else
        :: x = fx[n]; power_off(x); x = 0; fpc[n] = F_OFF                     /* confirmed off by status */
#endif
        :: !power[fx[n]] -> fpc[n] = F_OFF                                    /* already off: confirmed */
        :: bmcfail > 0 -> bmcfail--; fpc[n] = F_FAILED                        /* fails, or no confirmation */
        fi }
    :: atomic { fpc[n] == F_OFF && dup[n] ->                                  /* F3: `fenced` (D3) */
        if
        :: zk(n) && flock[fx[n]] == n && nver[fx[n]] == fver[n] ->            /* the version it claimed */
           vst[fx[n]] = D_FENCED; vver[fx[n]] = fver[n]; fpc[n] = F_RECOVER
        :: else -> flock[fx[n]] = NONE; fx[n] = NONE; fver[n] = 0; fpc[n] = F_IDLE
        fi }
    :: atomic { fpc[n] == F_FAILED && dup[n] ->                               /* F4: `fence-failed`: no recovery */
        if
        :: zk(n) && flock[fx[n]] == n && nver[fx[n]] == fver[n] ->
           vst[fx[n]] = D_FFAILED; vver[fx[n]] = fver[n]
        :: else -> skip
        fi;
        flock[fx[n]] = NONE; fx[n] = NONE; fver[n] = 0; fpc[n] = F_IDLE }
    :: atomic { fpc[n] == F_RECOVER && dup[n] ->                              /* F5: recover (D4), or end */
        if
#ifndef BROKEN_NO_RECOVERY
        :: zk(n) && flock[fx[n]] == n && rec_checks(fx[n]) && rstep == S_NONE &&
              vnode == fx[n] && est((fx[n] + 1) % N) == D_RUN -> vnode = (fx[n] + 1) % N   /* the selector's choice */
        :: zk(n) && flock[fx[n]] == n && rec_checks(fx[n]) && rstep == S_NONE &&
              vnode == fx[n] && est((fx[n] + 2) % N) == D_RUN -> vnode = (fx[n] + 2) % N
#endif
        :: zk(n) && flock[fx[n]] == n && est(fx[n]) == D_FENCED && rstep != S_NONE && est(rsrc) == D_FENCED &&
              est(rtgt) == D_FENCED -> abort_to(rsrc)                         /* D5: both sides fenced */
        :: else -> skip
        fi;
        flock[fx[n]] = NONE; fx[n] = NONE; fver[n] = 0; fpc[n] = F_IDLE }
    /* F6: a fenced node still has a VM to recover (nothing fitted before, or an abort gave it
     * back), or a migration between it and another fenced node: take its lock again */
    :: atomic { zk(n) && booted[n] && est(n) == D_RUN && fpc[n] == F_IDLE &&
                   est((n + 1) % N) == D_FENCED && flock[(n + 1) % N] == NONE &&
                   ((rstep == S_NONE && vnode == (n + 1) % N) ||
                       (rstep != S_NONE && est(rsrc) == D_FENCED && est(rtgt) == D_FENCED)) ->
        fx[n] = (n + 1) % N; flock[fx[n]] = n; fver[n] = nver[fx[n]]; fpc[n] = F_RECOVER }
    :: atomic { zk(n) && booted[n] && est(n) == D_RUN && fpc[n] == F_IDLE &&
                   est((n + 2) % N) == D_FENCED && flock[(n + 2) % N] == NONE &&
                   ((rstep == S_NONE && vnode == (n + 2) % N) ||
                       (rstep != S_NONE && est(rsrc) == D_FENCED && est(rtgt) == D_FENCED)) ->
        fx[n] = (n + 2) % N; flock[fx[n]] = n; fver[n] = nver[fx[n]]; fpc[n] = F_RECOVER }
    od
}

/* ======================================================================================== */
/* libvirt's live migration job: libvirtd finishes it, or fails it, whatever the daemons do.  */
proctype Libvirt()
{
end_idle:
    do
    :: atomic { job -> lv[jsrc] = OFF; lv[jtgt] = RUNNING; job = false; jres = 1 }   /* L1: switch-over */
    :: atomic { job -> lv[jtgt] = OFF; job = false; jres = 2 }                        /* L2: job failed */
    od
}

/* ======================================================================================== */
/* Operators and faults, each bounded.                                                       */
proctype Environment()
{
    byte x;
end_idle:
    do
    /* operators */
    :: atomic { requests > 0 && rstep == S_NONE && quorum && vnode != 0 && est(0) == D_RUN ->   /* O1: vm_migrate request */
        requests--; rsrc = vnode; rtgt = 0; vnode = 0; rstep = S_REQ;
        if :: rmeth = RM_DEFAULT :: rmeth = RM_LIVE fi }
    :: atomic { requests > 0 && rstep == S_NONE && quorum && vnode != 1 && est(1) == D_RUN ->
        requests--; rsrc = vnode; rtgt = 1; vnode = 1; rstep = S_REQ;
        if :: rmeth = RM_DEFAULT :: rmeth = RM_LIVE fi }
    :: atomic { requests > 0 && rstep == S_NONE && quorum && vnode != 2 && est(2) == D_RUN ->
        requests--; rsrc = vnode; rtgt = 2; vnode = 2; rstep = S_REQ;
        if :: rmeth = RM_DEFAULT :: rmeth = RM_LIVE fi }
    :: atomic { retargets > 0 && (rstep == S_REQ || rstep == S_PREP) && quorum ->   /* O2: node changed */
        retargets--;
        if
        :: rtgt != 0 && rsrc != 0 -> vnode = 0
        :: rtgt != 1 && rsrc != 1 -> vnode = 1
        :: rtgt != 2 && rsrc != 2 -> vnode = 2
        :: vnode = rsrc
        fi }
    :: atomic { quorum && est(0) == D_FFAILED && !power[0] -> own[0] = D_FENCED; nver[0]++ }  /* O3: confirm_down */
    :: atomic { quorum && est(1) == D_FFAILED && !power[1] -> own[1] = D_FENCED; nver[1]++ }
    :: atomic { quorum && est(2) == D_FFAILED && !power[2] -> own[2] = D_FENCED; nver[2]++ }
    :: atomic { est(0) == D_FFAILED && power[0] -> power_off(0) }           /* O4: manual power-off */
    :: atomic { est(1) == D_FFAILED && power[1] -> power_off(1) }
    :: atomic { est(2) == D_FFAILED && power[2] -> power_off(2) }
    :: atomic { repairs > 0 && !power[0] -> repairs--; power[0] = true }   /* O5: power on after repair */
    :: atomic { repairs > 0 && !power[1] -> repairs--; power[1] = true }
    :: atomic { repairs > 0 && !power[2] -> repairs--; power[2] = true }
    :: atomic { quorum && est(0) == D_FENCED && booted[0] -> own[0] = D_RUN; nver[0]++ }   /* O6: node ready */
    :: atomic { quorum && est(1) == D_FENCED && booted[1] -> own[1] = D_RUN; nver[1]++ }
    :: atomic { quorum && est(2) == D_FENCED && booted[2] -> own[2] = D_RUN; nver[2]++ }

    /* faults */
    :: atomic { faults > 0 -> faults--;                                       /* E1: a daemon is killed */
        if :: x = 0 :: x = 1 :: x = 2 fi;
        dup[x] = false; booted[x] = false; sess[x] = false; wpc[x] = W_IDLE; fpc[x] = F_IDLE; fx[x] = NONE; kpend[x] = false;
        kver[x] = 0; kst[x] = 0;
        fver[x] = 0; release_locks(x); x = 0 }
    :: atomic { faults > 0 -> faults--;                                       /* E2: a session expires */
        if :: x = 0 :: x = 1 :: x = 2 fi;
        sess[x] = false; release_locks(x); x = 0 }
    :: atomic { faults > 0 -> faults--;                                       /* E3: a partition */
        if :: x = 0 :: x = 1 :: x = 2 fi;
        part[x] = true; x = 0 }
    :: atomic { faults > 0 && quorum -> faults--; quorum = false }            /* E4: ZooKeeper loses quorum */
    :: atomic { faults > 0 -> faults--;                                       /* E11: a node's keepalives are late */
        if :: x = 0 :: x = 1 :: x = 2 fi;
        late[x] = true; x = 0 }
    :: atomic { faults > 0 && powerlosses > 0 -> faults--; powerlosses--;    /* E5: a host loses power */
        if :: x = 0 :: x = 1 :: x = 2 fi;
        power_off(x); x = 0 }

    /* what the environment gives back */
    :: atomic { part[0] && !sess[0] -> part[0] = false }                      /* E6: a partition heals */
    :: atomic { part[1] && !sess[1] -> part[1] = false }
    :: atomic { part[2] && !sess[2] -> part[2] = false }
    :: atomic { part[0] && sess[0] -> sess[0] = false; release_locks(0) }     /* E7: a partitioned session expires */
    :: atomic { part[1] && sess[1] -> sess[1] = false; release_locks(1) }
    :: atomic { part[2] && sess[2] -> sess[2] = false; release_locks(2) }
    :: atomic { !quorum -> quorum = true }                                    /* E8: quorum is back */
    :: atomic { power[0] && !dup[0] -> dup[0] = true }                        /* E9: systemd restarts the daemon */
    :: atomic { power[1] && !dup[1] -> dup[1] = true }
    :: atomic { power[2] && !dup[2] -> dup[2] = true }
    :: atomic { dup[0] && !sess[0] && !part[0] && quorum -> sess[0] = true; booted[0] = false }   /* E10: new session */
    :: atomic { dup[1] && !sess[1] && !part[1] && quorum -> sess[1] = true; booted[1] = false }
    :: atomic { dup[2] && !sess[2] && !part[2] && quorum -> sess[2] = true; booted[2] = false }
    od
}

init {
    atomic {
        byte i = 0;
        do
        :: i < N -> own[i] = D_RUN; vst[i] = D_RUN; sess[i] = true; power[i] = true; dup[i] = true; booted[i] = true;
                    flock[i] = NONE; fx[i] = NONE; i++
        :: else -> break
        od;
        lv[0] = RUNNING;
        run Daemon(0); run Daemon(1); run Daemon(2);
        run Fencer(0); run Fencer(1); run Fencer(2);
        run Libvirt(); run Environment()
    }
}

/* I1: never running on two nodes */
ltl never_twice { [] !two_running }
/* I2 within the bounds: once the faults are spent and the environment has given back what it
 * can, the VM runs (and stays running) somewhere */
ltl eventually_runs { <> [] runs_somewhere }
