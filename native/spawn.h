/*
 * spawn.h - capvisor's native spawn helper (see spawn.c).
 *
 * One entry point, cv_spawn(): start a child that places its fds, locks
 * itself down and execs, and tell the caller either the child's pid and
 * pidfd or the step at which the child setup failed and the errno there.
 *
 * native/build.py hands everything between the cffi-cdef markers to cffi
 * as its cdef, so keep that part to plain declarations (no #include, no
 * #if; a #define only for an integer constant).
 */
#ifndef CAPVISOR_SPAWN_H
#define CAPVISOR_SPAWN_H

#include <stddef.h>
#include <stdint.h>

/* cffi-cdef-begin */

/*
 * The steps of a spawn, in the order they run. The first two run in the
 * parent, the rest in the child. supervisor/native.py exports the names
 * (cv_step_name) as STEPS, so the numbers never leave this library.
 */
enum cv_step {
	CV_STEP_SOCKETPAIR,   /* parent: create the failure channel */
	CV_STEP_CLONE,        /* parent: child stack, clone() */
	CV_STEP_SIGNALS,      /* child: default dispositions, empty mask */
	CV_STEP_CGROUP,       /* child: write "0" to cgroup_procs_fd (service) */
	CV_STEP_FDS,          /* child: fds[i] -> i, close everything else */
	CV_STEP_CHDIR,        /* child: chdir(cwd) */
	CV_STEP_SETSID,       /* child: setsid() */
	CV_STEP_PDEATHSIG,    /* child: prctl(PR_SET_PDEATHSIG) (service) */
	CV_STEP_RLIMITS,      /* child: setrlimit() for each limit */
	CV_STEP_CAPABILITIES, /* child: drop every capability (see spawn.c) */
	CV_STEP_NO_NEW_PRIVS, /* child: prctl(PR_SET_NO_NEW_PRIVS) */
	CV_STEP_LANDLOCK,     /* child: landlock_restrict_self(ruleset) */
	CV_STEP_SECCOMP,      /* child: seccomp(SET_MODE_FILTER) */
	CV_STEP_EXECVE,       /* child: execve() */
	CV_STEP_COUNT
};

/* One resource limit; RLIM_INFINITY is UINT64_MAX. */
struct cv_rlimit {
	int resource;
	uint64_t soft;
	uint64_t hard;
};

/* What to spawn. Nothing here is modified; all of it must stay valid
 * for the duration of the call. */
struct cv_spawn_args {
	const char *path;          /* for execve */
	char *const *argv;         /* NULL-terminated */
	char *const *envp;         /* NULL-terminated */
	const int *fds;            /* fds[i] is placed at i; -1 leaves i closed */
	int nfds;
	const char *cwd;           /* NULL: the parent's */
	int new_session;           /* nonzero: setsid() */
	const struct cv_rlimit *rlimits;
	int nrlimits;
	int landlock_ruleset_fd;   /* < 0: no Landlock */
	const void *seccomp_bpf;   /* struct sock_filter[seccomp_len] */
	unsigned int seccomp_len;  /* instructions; 0: no filter */
	char *listen_pid;          /* NULL, or an envp entry "LISTEN_PID=" with room
	                              for 20 digits: the child writes its pid there */
	int seccomp_listener;      /* nonzero: install the filter with
	                              SECCOMP_FILTER_FLAG_NEW_LISTENER and hand the
	                              listener fd to the caller (see spawn.c) */
	int cgroup_procs_fd;       /* >= 0: an O_WRONLY fd of a cgroup v2
	                              cgroup.procs; the child moves itself there
	                              before anything else (service, issue 6) */
	int parent_death_signal;   /* > 0: PR_SET_PDEATHSIG with this signal, so
	                              the child dies with the spawning thread */
};

/* The sendmsg() flags of the one message that carries the listener fd. A
 * filter installed with seccomp_listener must let the child's
 * sendmsg(chan, msg, CV_LISTENER_MSG_FLAGS) and write(chan, ...) through
 * (chan is fd nfds), and execve and exit_group too if it notifies them. */
#define CV_LISTENER_MSG_FLAGS 0x4040 /* MSG_NOSIGNAL | MSG_DONTWAIT */

/* The outcome. On success pid and pidfd (O_CLOEXEC, owned by the caller),
 * and listener when asked for, are set and step is -1; on failure step and
 * err are set, pid, pidfd and listener are -1, and nothing is left behind:
 * no fd, no zombie. */
struct cv_spawn_result {
	int pid;
	int pidfd;
	int step;
	int err;
	int listener;              /* the seccomp listener (O_CLOEXEC, owned by
	                              the caller), or -1 */
};

/* Returns 0 on success, -1 on failure (see struct cv_spawn_result). */
int cv_spawn(const struct cv_spawn_args *a, struct cv_spawn_result *r);

/* The name of a step ("socketpair", ..., "execve"); NULL if out of range. */
const char *cv_step_name(int step);

/* cffi-cdef-end */

#endif /* CAPVISOR_SPAWN_H */
