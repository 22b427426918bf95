/* l_dist_launch.c — the one-machine launcher of data-parallel runs (iddpm._dist.launch),
 * behind `iddpm train RECIPE gpus=N` / `nproc=N` (lua/iddpm/dist.lua).
 *
 *   launch(argv, nproc, env [, grace_s]) -> exit status
 *     argv: the command line of every rank (argv[1] is replaced by this program,
 *     /proc/self/exe; no shell is involved); env: {NAME = value} set in every rank, plus
 *     IDDPM_RANK, IDDPM_LOCAL_RANK (= rank), IDDPM_WORLD_SIZE, IDDPM_LOCAL_WORLD_SIZE, and
 *     IDDPM_RING_FDS = "left,right": the rank's ends of a ring of Unix socket pairs (from
 *     rank-1, to rank+1), the CPU transport of forked ranks (l_dist_ring.c).
 *
 * Each rank runs in its own process group with its stdout and stderr on one pipe; the
 * launcher prints every line prefixed with "[rank R] " as it arrives. When a rank exits
 * with a failure (non-zero status or a signal), the launcher says which and why, sends
 * SIGTERM to the others, and SIGKILL after grace_s seconds (default 30). A Ctrl-C (or
 * SIGTERM) to the launcher is passed on to every rank (they save and stop); a second one
 * kills them. The status returned is 0 when every rank succeeded, else the first
 * failure's (128 + signal for a signal). */
#define _POSIX_C_SOURCE 200809L
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "l_common.h"

#define MAX_RANKS 256
#define LINE_MAX_BYTES 8192   /* a longer line is printed in pieces */

typedef struct {
    pid_t pid;
    int fd;          /* read end of the rank's output pipe, -1 at EOF */
    int running;
    int status;      /* exit status (128 + signal) once reaped */
    size_t len;      /* bytes pending in buf (an incomplete line) */
    char buf[LINE_MAX_BYTES];
} rank_proc;

static volatile sig_atomic_t got_signal;   /* the last SIGINT/SIGTERM the launcher got */
static volatile sig_atomic_t signal_count;

static void on_signal(int sig) {
    got_signal = sig;
    signal_count++;
}

static double mono(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void emit(int rank, const char *s, size_t n) {
    printf("[rank %d] %.*s\n", rank, (int)n, s);
    fflush(stdout);
}

/* read what the rank wrote; print its complete lines; 0 at EOF */
static int pump(rank_proc *r, int rank) {
    ssize_t k = read(r->fd, r->buf + r->len, sizeof r->buf - r->len);
    if (k < 0 && (errno == EINTR || errno == EAGAIN)) return 1;
    if (k <= 0) {
        if (r->len) emit(rank, r->buf, r->len);
        r->len = 0;
        return 0;
    }
    r->len += (size_t)k;
    size_t start = 0;
    for (size_t i = 0; i < r->len; i++)
        if (r->buf[i] == '\n') {
            emit(rank, r->buf + start, i - start);
            start = i + 1;
        }
    if (start == 0 && r->len == sizeof r->buf) {   /* no newline in a full buffer */
        emit(rank, r->buf, r->len);
        start = r->len;
    }
    memmove(r->buf, r->buf + start, r->len - start);
    r->len -= start;
    return 1;
}

static void signal_all(rank_proc *rp, int n, int sig) {
    for (int i = 0; i < n; i++)
        if (rp[i].running) kill(-rp[i].pid, sig);   /* the rank's process group */
}

/* reap finished ranks; returns the index of a newly failed one, or -1 */
static int reap(rank_proc *rp, int n) {
    int failed = -1;
    for (int i = 0; i < n; i++) {
        if (!rp[i].running) continue;
        int st;
        pid_t p = waitpid(rp[i].pid, &st, WNOHANG);
        if (p != rp[i].pid) continue;
        rp[i].running = 0;
        rp[i].status = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
        if (rp[i].status != 0 && failed < 0) failed = i;
    }
    return failed;
}

static void describe_exit(int rank, int status) {
    if (status > 128)
        fprintf(stderr, "iddpm: rank %d was killed by signal %d (%s)\n", rank, status - 128, strsignal(status - 128));
    else
        fprintf(stderr, "iddpm: rank %d failed with exit status %d\n", rank, status);
}

static pid_t spawn(char **argv, int rank, int nproc, int out_fd, int close_fd, int left, int right) {
    pid_t pid = fork();
    if (pid != 0) return pid;
    /* child: own process group, output to the pipe, rank variables, exec */
    setpgid(0, 0);
    dup2(out_fd, 1);
    dup2(out_fd, 2);
    close(out_fd);
    close(close_fd);
    signal(SIGINT, SIG_DFL);
    signal(SIGTERM, SIG_DFL);
    char v[32];
    snprintf(v, sizeof v, "%d", rank);
    setenv("IDDPM_RANK", v, 1);
    setenv("IDDPM_LOCAL_RANK", v, 1);
    snprintf(v, sizeof v, "%d", nproc);
    setenv("IDDPM_WORLD_SIZE", v, 1);
    setenv("IDDPM_LOCAL_WORLD_SIZE", v, 1);
    fcntl(left, F_SETFD, 0);   /* the ring ends survive exec; every other pair closes */
    fcntl(right, F_SETFD, 0);
    snprintf(v, sizeof v, "%d,%d", left, right);
    setenv("IDDPM_RING_FDS", v, 1);
    execv("/proc/self/exe", argv);
    fprintf(stderr, "iddpm: rank %d: cannot start %s: %s\n", rank, "/proc/self/exe", strerror(errno));
    _exit(127);
}

int lt_dist_launch(lua_State *L);
int lt_dist_launch(lua_State *L) {
    luaL_checktype(L, 1, LUA_TTABLE);
    int nproc = (int)luaL_checkinteger(L, 2);
    luaL_argcheck(L, nproc >= 1 && nproc <= MAX_RANKS, 2, "nproc must be between 1 and 256");
    double grace = luaL_optnumber(L, 4, 30);
    int argc = (int)luaL_len(L, 1);
    luaL_argcheck(L, argc >= 1, 1, "empty command line");
    char **argv = lua_newuserdatauv(L, sizeof(char *) * (size_t)(argc + 1), 0);
    for (int i = 0; i < argc; i++) {
        lua_rawgeti(L, 1, i + 1);
        argv[i] = (char *)luaL_checkstring(L, -1);   /* kept alive by the argv table */
        lua_pop(L, 1);
    }
    argv[argc] = NULL;
    if (lua_istable(L, 3)) {   /* the common environment (set here, inherited by the ranks) */
        lua_pushnil(L);
        while (lua_next(L, 3)) {
            setenv(luaL_checkstring(L, -2), luaL_checkstring(L, -1), 1);
            lua_pop(L, 1);
        }
    }
    rank_proc *rp = lua_newuserdatauv(L, sizeof *rp * (size_t)nproc, 0);
    memset(rp, 0, sizeof *rp * (size_t)nproc);
    int(*ring)[2] = lua_newuserdatauv(L, sizeof *ring * (size_t)nproc, 0);
    for (int k = 0; k < nproc; k++)   /* pair k: rank k writes [0], rank k+1 reads [1] */
        if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, ring[k]) != 0) {
            int e = errno;
            for (int j = 0; j < k; j++) { close(ring[j][0]); close(ring[j][1]); }
            return luaL_error(L, "dist.launch: cannot make the ranks' socket pairs: %s", strerror(e));
        }
    struct sigaction sa, old_int, old_term;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, &old_int);
    sigaction(SIGTERM, &sa, &old_term);
    got_signal = 0;
    signal_count = 0;
    fflush(stdout);
    fflush(stderr);
    int started = 0;
    for (int i = 0; i < nproc; i++) {
        int p[2];
        if (pipe(p) != 0) break;
        fcntl(p[0], F_SETFD, FD_CLOEXEC);
        rp[i].pid = spawn(argv, i, nproc, p[1], p[0], ring[(i + nproc - 1) % nproc][1], ring[i][0]);
        close(p[1]);
        if (rp[i].pid < 0) { close(p[0]); break; }
        setpgid(rp[i].pid, rp[i].pid);   /* also here: no race with the first kill */
        rp[i].fd = p[0];
        rp[i].running = 1;
        started++;
    }
    for (int k = 0; k < nproc; k++) { close(ring[k][0]); close(ring[k][1]); }
    int result = 0, stopping = 0, seen_signals = 0;
    double stop_at = 0;
    if (started < nproc) {
        fprintf(stderr, "iddpm: could only start %d of %d ranks: %s\n", started, nproc, strerror(errno));
        result = 1;
        stopping = 1;
        stop_at = mono();
        signal_all(rp, started, SIGTERM);
    }
    for (;;) {
        struct pollfd pf[MAX_RANKS];
        int idx[MAX_RANKS], np = 0, alive = 0;
        for (int i = 0; i < started; i++) {
            if (rp[i].fd >= 0) { pf[np].fd = rp[i].fd; pf[np].events = POLLIN; idx[np++] = i; }
            alive += rp[i].running;
        }
        if (np == 0 && alive == 0) break;
        int k = poll(pf, (nfds_t)np, 200);
        for (int j = 0; k > 0 && j < np; j++)
            if (pf[j].revents && !pump(&rp[idx[j]], idx[j])) {
                close(rp[idx[j]].fd);
                rp[idx[j]].fd = -1;
            }
        if (signal_count > seen_signals) {   /* Ctrl-C / SIGTERM: pass on; the second kills */
            seen_signals = signal_count;
            if (seen_signals == 1) {
                signal_all(rp, started, got_signal);
                if (!stopping) { stopping = 1; stop_at = mono(); }
            } else {
                signal_all(rp, started, SIGKILL);
            }
            if (!result) result = 128 + got_signal;
        }
        int failed = reap(rp, started);
        if (failed >= 0 && !stopping) {
            describe_exit(failed, rp[failed].status);
            fprintf(stderr, "iddpm: stopping the other ranks\n");
            result = rp[failed].status;
            stopping = 1;
            stop_at = mono();
            signal_all(rp, started, SIGTERM);
        }   /* ranks that fail after being told to stop are not reported one by one */
        if (stopping && mono() - stop_at > grace) {
            signal_all(rp, started, SIGKILL);
            stop_at = mono() + 1e9;   /* once */
        }
        if (np == 0 && alive > 0) {   /* every pipe closed, ranks still exiting */
            struct timespec ts = {0, 20000000};
            nanosleep(&ts, NULL);
        }
    }
    sigaction(SIGINT, &old_int, NULL);
    sigaction(SIGTERM, &old_term, NULL);
    lua_pushinteger(L, result);
    return 1;
}
