/*
 * spawn.c - capvisor's native spawn helper.
 *
 * cv_spawn() starts one confined child (DESIGN.md section 4):
 *
 *   parent                              child (shares the parent's memory)
 *   ------                              -----
 *   socketpair -> failure channel
 *   block every signal
 *   clone(CLONE_VM|CLONE_VFORK|   ---->  reset signal dispositions, empty mask
 *         CLONE_PIDFD)                   into its cgroup (optional)
 *                                        place fds, close the rest
 *     (this thread sleeps until          chdir, setsid, PDEATHSIG (optional),
 *      the child execs or exits)         setrlimit, drop capabilities
 *                                        no_new_privs, landlock, seccomp
 *                                          (with a listener: send it on
 *                                          the channel, see send_listener)
 *                                        execve
 *                                          on any failure: write
 *                                          {step, errno} to the channel,
 *                                          _exit(127)
 *   restore the signal mask
 *   read the channel: the listener (step -1, SCM_RIGHTS) first if one
 *   was asked for; a report means failure -> reap the child, close the
 *   pidfd and the listener, return the step; no report means execve
 *   succeeded.
 *
 * Why clone(CLONE_VM | CLONE_VFORK) and not fork(): the child borrows the
 * parent's address space instead of copying its page tables, so the cost
 * of a spawn does not grow with the supervisor's memory. The price is that
 * the child runs on memory the parent's other threads also use, so the
 * child only makes system calls and async-signal-safe libc calls: no
 * malloc, no locks, no stdio, nothing that touches shared state. Anything
 * that needs memory is prepared by the parent before clone(). The library
 * is linked with -z now so the child never runs the lazy PLT resolver.
 *
 * Each child step is one line of child_setup(), in order, returning early
 * with the step that failed; errno is saved first, at the failure site.
 */
#define _GNU_SOURCE
#include "spawn.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/capability.h>
#include <linux/filter.h>
#include <sched.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

/*
 * Constants the system headers may be too old to know. Syscalls numbered
 * from 424 on have the same number on every architecture but alpha.
 */
#ifndef SYS_close_range
#define SYS_close_range 436
#endif
#ifndef SYS_landlock_restrict_self
#define SYS_landlock_restrict_self 446
#endif
#ifndef SYS_seccomp
#error "SYS_seccomp is not defined: the system headers are too old"
#endif
#define CV_SECCOMP_SET_MODE_FILTER 1
#define CV_SECCOMP_FILTER_FLAG_NEW_LISTENER (1UL << 3)
#ifndef CLONE_PIDFD
#define CLONE_PIDFD 0x00001000
#endif
#ifndef P_PIDFD
#define P_PIDFD 3
#endif

/* The child's stack: mmap'd per spawn, with a guard page below it. The
 * child's deepest call is a libc wrapper inside child_setup(). */
#define CHILD_STACK_SIZE (64 * 1024)

/* Bytes in the kernel's signal set (not glibc's 1024-bit sigset_t). */
#define KERNEL_SIGSET_SIZE (_NSIG / 8)

static const char *const step_names[CV_STEP_COUNT] = {
	[CV_STEP_SOCKETPAIR] = "socketpair",
	[CV_STEP_CLONE] = "clone",
	[CV_STEP_SIGNALS] = "signals",
	[CV_STEP_FDS] = "fds",
	[CV_STEP_CHDIR] = "chdir",
	[CV_STEP_SETSID] = "setsid",
	[CV_STEP_RLIMITS] = "rlimits",
	[CV_STEP_CAPABILITIES] = "capabilities",
	[CV_STEP_NO_NEW_PRIVS] = "no_new_privs",
	[CV_STEP_LANDLOCK] = "landlock",
	[CV_STEP_SECCOMP] = "seccomp",
	[CV_STEP_EXECVE] = "execve",
	[CV_STEP_CGROUP] = "cgroup",
	[CV_STEP_PDEATHSIG] = "pdeathsig",
};

const char *cv_step_name(int step)
{
	if (step < 0 || step >= CV_STEP_COUNT)
		return NULL;
	return step_names[step];
}

/* The record the child sends on failure; SOCK_SEQPACKET keeps it whole. */
struct report {
	int step;
	int err;
};

/*
 * Everything the child needs, prepared by the parent. It lives on the
 * parent's stack; the child reads it and writes only into copies[].
 */
struct child {
	const struct cv_spawn_args *a;
	int chan;     /* write end of the failure channel (CLOEXEC) */
	int base;     /* above every target and every source fd, >= nfds + 2 */
	int *copies;  /* nfds slots of scratch for place_fds() */
	int sigrtmin; /* first signal not reserved by glibc */
	int parent;   /* the caller's pid, to notice it died before PDEATHSIG */
};

/* Record a failed step. Call it right after the failing call: it reads
 * errno before anything else can change it. */
static int fail(struct report *rep, int step)
{
	rep->err = errno;
	rep->step = step;
	return -1;
}

/* Block (how = SIG_SETMASK with a full set) or restore the signal mask of
 * the calling thread, all 64 signals. The raw syscall because glibc's
 * sigfillset() and pthread_sigmask() leave out the two signals glibc
 * reserves for itself (SIGCANCEL, SIGSETXID), and their handlers must not
 * run in the child either. */
static int set_kernel_sigmask(const sigset_t *set, sigset_t *old)
{
	return (int)syscall(SYS_rt_sigprocmask, SIG_SETMASK, set, old,
			    KERNEL_SIGSET_SIZE);
}

/*
 * Step "signals". The child starts with every signal blocked (the parent
 * blocked them around clone) and with a copy of the parent's dispositions:
 * Python's handlers (which would run Python code on shared memory) and the
 * signals Python ignores (SIGPIPE, SIGXFSZ), which execve would pass on.
 * Set all of them to SIG_DFL, then unblock everything.
 *
 * glibc refuses sigaction() on the signals it reserves (32 up to SIGRTMIN);
 * they can only carry glibc's own handlers, never SIG_IGN, so they stay
 * blocked until execve, which resets handled signals to SIG_DFL anyway.
 */
static int reset_signals(const struct child *c, struct report *rep)
{
	struct sigaction dfl;
	sigset_t empty;

	memset(&dfl, 0, sizeof dfl);
	dfl.sa_handler = SIG_DFL;
	sigemptyset(&dfl.sa_mask);
	for (int sig = 1; sig < _NSIG; sig++) {
		if (sig == SIGKILL || sig == SIGSTOP)
			continue;
		if (sig >= 32 && sig < c->sigrtmin)
			continue;
		if (sigaction(sig, &dfl, NULL) < 0)
			return fail(rep, CV_STEP_SIGNALS);
	}
	sigemptyset(&empty);
	if (set_kernel_sigmask(&empty, NULL) < 0)
		return fail(rep, CV_STEP_SIGNALS);
	return 0;
}

/*
 * Step "fds": make fds[i] appear at i for every i < nfds, leave i closed
 * where fds[i] is -1, and close everything else. Correct when sources and
 * targets overlap (fds[3] = 4 and fds[4] = 3), chain, or repeat (one
 * source at two targets), because no target is written before every
 * source has been copied out of the way:
 *
 *   1. move the channel and the ruleset to fds >= base (CLOEXEC), where
 *      base is above every target and every source, so no dup3 below can
 *      clobber them;
 *   2. copy every source to an fd >= base (CLOEXEC);
 *   3. dup3 each copy onto its target (without CLOEXEC: it must survive
 *      execve) and close targets that get nothing;
 *   4. move the channel to nfds and the ruleset to nfds + 1 (CLOEXEC);
 *   5. close_range everything above: the copies, the parent's other fds
 *      (inheritable or not), the other end of the channel.
 *
 * After execve the child has exactly fds 0 .. nfds-1: the channel closes
 * on exec, the ruleset right after landlock_restrict_self.
 *
 * A ruleset fd that cannot be moved is reported as a "landlock" failure:
 * that is where the caller should look (EBADF: it was not open).
 */
static int place_fds(const struct child *c, int *chan, int *ruleset,
		     struct report *rep)
{
	const struct cv_spawn_args *a = c->a;
	int n = a->nfds;
	int fd, first_unused;

	/* 1. */
	fd = fcntl(*chan, F_DUPFD_CLOEXEC, c->base);
	if (fd < 0)
		return fail(rep, CV_STEP_FDS);
	*chan = fd;
	if (a->landlock_ruleset_fd >= 0) {
		fd = fcntl(a->landlock_ruleset_fd, F_DUPFD_CLOEXEC, c->base);
		if (fd < 0)
			return fail(rep, CV_STEP_LANDLOCK);
		*ruleset = fd;
	}

	/* 2. */
	for (int i = 0; i < n; i++) {
		c->copies[i] = -1;
		if (a->fds[i] < 0)
			continue;
		c->copies[i] = fcntl(a->fds[i], F_DUPFD_CLOEXEC, c->base);
		if (c->copies[i] < 0)
			return fail(rep, CV_STEP_FDS);
	}

	/* 3. Copies are >= base > i, so dup3 never sees oldfd == newfd. */
	for (int i = 0; i < n; i++) {
		if (c->copies[i] < 0)
			close(i); /* EBADF if it was not open: fine */
		else if (dup3(c->copies[i], i, 0) < 0)
			return fail(rep, CV_STEP_FDS);
	}

	/* 4. Both are >= base >= n + 2, so again never oldfd == newfd. */
	fd = dup3(*chan, n, O_CLOEXEC);
	if (fd < 0)
		return fail(rep, CV_STEP_FDS);
	*chan = fd;
	first_unused = n + 1;
	if (*ruleset >= 0) {
		fd = dup3(*ruleset, n + 1, O_CLOEXEC);
		if (fd < 0)
			return fail(rep, CV_STEP_LANDLOCK);
		*ruleset = fd;
		first_unused = n + 2;
	}

	/* 5. Our own fd table: clone() without CLONE_FILES copied it. */
	if (syscall(SYS_close_range, (unsigned int)first_unused, ~0U, 0) < 0)
		return fail(rep, CV_STEP_FDS);
	return 0;
}

/* Step "rlimits". */
static int set_rlimits(const struct cv_spawn_args *a, struct report *rep)
{
	for (int i = 0; i < a->nrlimits; i++) {
		struct rlimit rl = {
			.rlim_cur = (rlim_t)a->rlimits[i].soft,
			.rlim_max = (rlim_t)a->rlimits[i].hard,
		};
		if (setrlimit(a->rlimits[i].resource, &rl) < 0)
			return fail(rep, CV_STEP_RLIMITS);
	}
	return 0;
}

/*
 * Step "capabilities": the program gets no capability, whoever runs the
 * supervisor. A root supervisor's child would otherwise keep all of root's
 * (CAP_SYS_RESOURCE lifts rlimits, CAP_DAC_OVERRIDE ignores file modes,
 * ...). With CAP_SETPCAP (root): empty the bounding set, and lock the
 * securebits so that neither execve of a root-owned or setuid-root program
 * nor a uid change gives any back (SECBIT_NOROOT, NO_SETUID_FIXUP,
 * KEEP_CAPS, NO_CAP_AMBIENT_RAISE, each with its lock). Then, for
 * everyone, clear the ambient set and empty permitted, effective and
 * inheritable. An unprivileged caller has nothing to drop but its ambient
 * set, and no_new_privs (next step) keeps execve from granting file caps.
 */
#define CV_SECUREBITS_ALL_LOCKED 0xff /* bits 0-7: four flags, four locks */
static int drop_capabilities(struct report *rep)
{
	struct __user_cap_header_struct head = {
		.version = _LINUX_CAPABILITY_VERSION_3, .pid = 0 };
	struct __user_cap_data_struct data[_LINUX_CAPABILITY_U32S_3];

	memset(data, 0, sizeof data);
	if (syscall(SYS_capget, &head, data) < 0)
		return fail(rep, CV_STEP_CAPABILITIES);
	if (data[CAP_TO_INDEX(CAP_SETPCAP)].effective & CAP_TO_MASK(CAP_SETPCAP)) {
		for (int cap = 0;; cap++) {
			if (prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) == 0)
				continue;
			if (errno == EINVAL) /* past the last capability */
				break;
			return fail(rep, CV_STEP_CAPABILITIES);
		}
		if (prctl(PR_SET_SECUREBITS, CV_SECUREBITS_ALL_LOCKED, 0, 0, 0) < 0)
			return fail(rep, CV_STEP_CAPABILITIES);
	}
	/* EINVAL: a kernel without ambient capabilities (< 4.3), none to clear. */
	if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) < 0 &&
	    errno != EINVAL)
		return fail(rep, CV_STEP_CAPABILITIES);
	memset(data, 0, sizeof data);
	if (syscall(SYS_capset, &head, data) < 0)
		return fail(rep, CV_STEP_CAPABILITIES);
	return 0;
}

/* Step "landlock": enforce the ruleset on ourselves, then drop its fd. */
static int restrict_self(int *ruleset, struct report *rep)
{
	if (syscall(SYS_landlock_restrict_self, *ruleset, 0) < 0)
		return fail(rep, CV_STEP_LANDLOCK);
	close(*ruleset);
	*ruleset = -1;
	return 0;
}

/*
 * Hand the seccomp listener to the parent: one message on the channel, a
 * report with step -1 carrying the fd with SCM_RIGHTS.
 *
 * Why this way. A filter with SECCOMP_RET_USER_NOTIF suspends each notified
 * call until someone answers on the listener fd, and only the supervisor can
 * answer. But the parent thread that could pick the fd up is asleep in
 * clone(CLONE_VFORK) until this child execs or exits, and the fd lives in
 * the child's own fd table (no CLONE_FILES). So the child must push the fd
 * to the parent with no help from it, and none of the calls it makes from
 * the install to execve may be notified, or nobody would ever answer:
 *
 *   seccomp(NEW_LISTENER)  the install itself, not filtered yet
 *   sendmsg(chan, CV_LISTENER_MSG_FLAGS)   queued on the channel; the
 *                          parent reads it after clone() returns
 *   execve                 the program; on failure write(chan), exit_group
 *
 * The filter is compiled in Python (supervisor/seccomp_notify.py) with a
 * prefix that allows exactly these: sendmsg and write on fd nfds (where
 * place_fds() put the channel) with those flags, exit_group, and, for the
 * recording filter of `policy learn`, execve. The listener is O_CLOEXEC, so
 * execve closes the child's copy; the channel is SOCK_SEQPACKET, so the
 * message and a later failure report stay apart.
 */
static int send_listener(int chan, int listener, struct report *rep)
{
	struct report hello = { .step = -1, .err = 0 };
	struct iovec iov = { .iov_base = &hello, .iov_len = sizeof hello };
	union {
		char buf[CMSG_SPACE(sizeof(int))];
		struct cmsghdr align;
	} control;
	struct msghdr msg;
	struct cmsghdr *cmsg;

	memset(&control, 0, sizeof control);
	memset(&msg, 0, sizeof msg);
	msg.msg_iov = &iov;
	msg.msg_iovlen = 1;
	msg.msg_control = control.buf;
	msg.msg_controllen = sizeof control.buf;
	cmsg = CMSG_FIRSTHDR(&msg);
	cmsg->cmsg_level = SOL_SOCKET;
	cmsg->cmsg_type = SCM_RIGHTS;
	cmsg->cmsg_len = CMSG_LEN(sizeof(int));
	memcpy(CMSG_DATA(cmsg), &listener, sizeof(int));
	if (sendmsg(chan, &msg, CV_LISTENER_MSG_FLAGS) < 0)
		return fail(rep, CV_STEP_SECCOMP);
	return 0;
}

/* Step "seccomp": install the filter the parent compiled. Last before
 * execve, so that it only has to allow what execve and the program need
 * (and the write of a failure report). With seccomp_listener, also hand
 * the listener to the parent (send_listener). */
static int install_seccomp(const struct cv_spawn_args *a, int chan,
			   struct report *rep)
{
	struct sock_fprog prog = {
		.len = (unsigned short)a->seccomp_len,
		.filter = (struct sock_filter *)a->seccomp_bpf,
	};
	unsigned long flags = a->seccomp_listener ? CV_SECCOMP_FILTER_FLAG_NEW_LISTENER : 0;
	long listener;

	listener = syscall(SYS_seccomp, CV_SECCOMP_SET_MODE_FILTER, flags, &prog);
	if (listener < 0)
		return fail(rep, CV_STEP_SECCOMP);
	if (a->seccomp_listener)
		return send_listener(chan, (int)listener, rep);
	return 0;
}

/*
 * systemd's LISTEN_PID must be the program's own pid, which only the child
 * knows: write it, in decimal, after the "LISTEN_PID=" of the envp entry the
 * parent reserved (room for 20 digits and the NUL). No allocation, no libc
 * formatting.
 */
static void write_listen_pid(char *entry)
{
	char digits[24];
	int n = 0;
	long pid = syscall(SYS_getpid);
	char *out = entry + sizeof("LISTEN_PID=") - 1;

	do {
		digits[n++] = (char)('0' + pid % 10);
		pid /= 10;
	} while (pid > 0);
	while (n > 0)
		*out++ = digits[--n];
	*out = '\0';
}

/*
 * The child setup, as one ordered list of steps. Returns only on failure,
 * with *rep filled in and *chan the channel's current fd.
 */
static void child_setup(const struct child *c, int *chan, struct report *rep)
{
	const struct cv_spawn_args *a = c->a;
	int ruleset = -1;

	if (reset_signals(c, rep) < 0)
		return;
	/* Into the program's cgroup while its fd is still open (service). */
	if (a->cgroup_procs_fd >= 0 && write(a->cgroup_procs_fd, "0", 1) != 1) {
		fail(rep, CV_STEP_CGROUP);
		return;
	}
	if (place_fds(c, chan, &ruleset, rep) < 0)
		return;
	if (a->cwd != NULL && chdir(a->cwd) < 0) {
		fail(rep, CV_STEP_CHDIR);
		return;
	}
	if (a->new_session && setsid() < 0) {
		fail(rep, CV_STEP_SETSID);
		return;
	}
	/* Die with the supervisor (service); if it is already gone, now. */
	if (a->parent_death_signal > 0) {
		if (prctl(PR_SET_PDEATHSIG, a->parent_death_signal, 0, 0, 0) < 0) {
			fail(rep, CV_STEP_PDEATHSIG);
			return;
		}
		if (getppid() != c->parent)
			_exit(127);
	}
	if (a->listen_pid != NULL)
		write_listen_pid(a->listen_pid);
	if (set_rlimits(a, rep) < 0)
		return;
	if (drop_capabilities(rep) < 0)
		return;
	if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0) {
		fail(rep, CV_STEP_NO_NEW_PRIVS);
		return;
	}
	if (ruleset >= 0 && restrict_self(&ruleset, rep) < 0)
		return;
	if (a->seccomp_len > 0 && install_seccomp(a, *chan, rep) < 0)
		return;
	execve(a->path, a->argv, a->envp);
	fail(rep, CV_STEP_EXECVE);
}

/* The child's entry point (clone's fn). Never returns. */
static int child_main(void *arg)
{
	const struct child *c = arg;
	int chan = c->chan;
	struct report rep;

	child_setup(c, &chan, &rep);
	/* Nothing useful to do if this fails: the parent then sees no report
	 * and the caller sees the child exit with 127. */
	(void)!write(chan, &rep, sizeof rep);
	_exit(127);
}

/* A failure in the parent, before any child exists. */
static int parent_fail(struct cv_spawn_result *r, int step, int err)
{
	r->step = step;
	r->err = err;
	return -1;
}

/* Read one message from the channel without waiting; an fd passed with it
 * (the seccomp listener) is stored in *listener. Returns recvmsg's result. */
static ssize_t read_report(int chan, struct report *rep, int *listener)
{
	struct iovec iov = { .iov_base = rep, .iov_len = sizeof *rep };
	union {
		char buf[CMSG_SPACE(sizeof(int))];
		struct cmsghdr align;
	} control;
	struct msghdr msg;
	struct cmsghdr *cmsg;
	ssize_t got;

	memset(&msg, 0, sizeof msg);
	msg.msg_iov = &iov;
	msg.msg_iovlen = 1;
	msg.msg_control = control.buf;
	msg.msg_controllen = sizeof control.buf;
	do
		got = recvmsg(chan, &msg, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
	while (got < 0 && errno == EINTR);
	for (cmsg = got < 0 ? NULL : CMSG_FIRSTHDR(&msg); cmsg != NULL;
	     cmsg = CMSG_NXTHDR(&msg, cmsg)) {
		if (cmsg->cmsg_level == SOL_SOCKET && cmsg->cmsg_type == SCM_RIGHTS &&
		    cmsg->cmsg_len == CMSG_LEN(sizeof(int))) {
			if (*listener >= 0)
				close(*listener);
			memcpy(listener, CMSG_DATA(cmsg), sizeof(int));
		}
	}
	return got;
}

int cv_spawn(const struct cv_spawn_args *a, struct cv_spawn_result *r)
{
	struct child c = { .a = a, .copies = NULL, .parent = getpid() };
	sigset_t all, old;
	struct report rep;
	int sv[2], pidfd = -1, pid, err, max_source = -1, listener = -1;
	char *stack;
	ssize_t got;

	r->pid = r->pidfd = r->step = r->listener = -1;
	r->err = 0;

	if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) < 0)
		return parent_fail(r, CV_STEP_SOCKETPAIR, errno);
	c.chan = sv[1];

	/*
	 * A source that is not open in the parent could have the number
	 * socketpair just returned, and the child would then pass the
	 * failure channel on as a program fd. Such a source would fail with
	 * EBADF if the channel did not exist; report exactly that.
	 */
	for (int i = 0; i < a->nfds; i++) {
		if (a->fds[i] == sv[0] || a->fds[i] == sv[1]) {
			close(sv[0]);
			close(sv[1]);
			return parent_fail(r, CV_STEP_FDS, EBADF);
		}
		if (a->fds[i] > max_source)
			max_source = a->fds[i];
	}
	if (a->landlock_ruleset_fd == sv[0] || a->landlock_ruleset_fd == sv[1]) {
		close(sv[0]);
		close(sv[1]);
		return parent_fail(r, CV_STEP_LANDLOCK, EBADF);
	}
	c.base = a->nfds + 2 > max_source + 1 ? a->nfds + 2 : max_source + 1;
	c.sigrtmin = SIGRTMIN;

	/* Memory the child needs: scratch for place_fds and a stack. */
	if (a->nfds > 0) {
		c.copies = calloc((size_t)a->nfds, sizeof *c.copies);
		if (c.copies == NULL) {
			err = errno;
			goto fail_before_clone;
		}
	}
	stack = mmap(NULL, CHILD_STACK_SIZE, PROT_READ | PROT_WRITE,
		     MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK, -1, 0);
	if (stack == MAP_FAILED) {
		err = errno;
		goto fail_before_clone;
	}
	/* Guard page: a stack overflow faults instead of corrupting memory. */
	(void)mprotect(stack, (size_t)sysconf(_SC_PAGESIZE), PROT_NONE);

	/*
	 * Block every signal so that no handler of the parent's runs in the
	 * child before reset_signals() (it would run on the shared memory
	 * and stack of this thread). clone() returns after the child has
	 * exec'd or exited: with CLONE_VFORK this thread sleeps until the
	 * child releases the address space. The stack grows down, so the
	 * child starts at its top.
	 */
	memset(&all, 0xff, sizeof all);
	sigemptyset(&old);
	set_kernel_sigmask(&all, &old);
	pid = clone(child_main, stack + CHILD_STACK_SIZE,
		    CLONE_VM | CLONE_VFORK | CLONE_PIDFD | SIGCHLD, &c, &pidfd);
	err = errno;
	set_kernel_sigmask(&old, NULL);

	munmap(stack, CHILD_STACK_SIZE);
	free(c.copies);
	close(sv[1]);
	if (pid < 0) {
		close(sv[0]);
		return parent_fail(r, CV_STEP_CLONE, err);
	}

	/*
	 * The child has exec'd or exited, so a report, if it sent one, is
	 * already queued: read without waiting. Waiting for EOF instead
	 * would also work, but EOF needs every copy of the write end closed,
	 * and a fork() in another thread of the parent since socketpair()
	 * holds one (until that process execs or exits). A seccomp listener
	 * (step -1, see send_listener) comes first.
	 */
	got = read_report(sv[0], &rep, &listener);
	if (got == (ssize_t)sizeof rep && rep.step == -1)
		got = read_report(sv[0], &rep, &listener);
	close(sv[0]);
	if (got != (ssize_t)sizeof rep || rep.step == -1) {
		/* No report (EAGAIN or EOF): execve succeeded. */
		r->pid = pid;
		r->pidfd = pidfd;
		r->listener = listener;
		return 0;
	}
	if (listener >= 0)
		close(listener);

	/* The child has exited (_exit(127)); reap it so it is no zombie. */
	{
		siginfo_t info;
		while (waitid((idtype_t)P_PIDFD, (id_t)pidfd, &info, WEXITED) < 0 &&
		       errno == EINTR)
			;
	}
	close(pidfd);
	return parent_fail(r, rep.step, rep.err);

fail_before_clone:
	free(c.copies);
	close(sv[0]);
	close(sv[1]);
	return parent_fail(r, CV_STEP_CLONE, err);
}
