/*
 * sbecho: a switchboard echo server and client in C, written from
 * docs/switchboard.md alone (no capvisor code), to show the protocol is
 * enough to speak it from any language.
 *
 *   sbecho serve FD [-n] [NAME=VALUE...]    server_start on the handle at FD,
 *                                           then echo every connection
 *   sbecho connect FD [NAME=VALUE...]       client_connect on the handle at FD,
 *                                           then copy stdin to the connection
 *                                           and the connection to stdout
 *
 * FD is a handle: a SOCK_SEQPACKET socket (from !server or !client, or a
 * connection to a broker's root socket made by the caller). -n first tries
 * to open a network socket of its own and reports what happened (under
 * capvisor's default policy: EPERM).
 *
 * Build: cc -O2 -Wall -o sbecho sbecho.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define MAX_MESSAGE 65536
#define MAX_CONNECTIONS 64

/* ---- building requests: JSON with escaped strings ---------------------- */

static size_t put(char *buf, size_t at, size_t cap, const char *s) {
    size_t n = strlen(s);
    if (at + n < cap) memcpy(buf + at, s, n);
    return at + n;
}

static size_t put_string(char *buf, size_t at, size_t cap, const char *s) {
    at = put(buf, at, cap, "\"");
    for (; *s; s++) {
        char esc[8];
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\') {
            esc[0] = '\\'; esc[1] = (char)c; esc[2] = 0;
        } else if (c < 0x20) {
            snprintf(esc, sizeof esc, "\\u%04x", c);
        } else {
            esc[0] = (char)c; esc[1] = 0;
        }
        at = put(buf, at, cap, esc);
    }
    return put(buf, at, cap, "\"");
}

/* {"v":2,"op":OP,"id":1,"labels":{NAME:VALUE,...}} from NAME=VALUE words. */
static int build_request(char *buf, size_t cap, const char *op, char **words, int n) {
    size_t at = put(buf, 0, cap, "{\"v\":2,\"op\":");
    at = put_string(buf, at, cap, op);
    at = put(buf, at, cap, ",\"id\":1,\"labels\":{");
    for (int i = 0; i < n; i++) {
        char *eq = strchr(words[i], '=');
        if (!eq) {
            fprintf(stderr, "sbecho: label %s must be NAME=VALUE\n", words[i]);
            return -1;
        }
        *eq = 0;
        if (i) at = put(buf, at, cap, ",");
        at = put_string(buf, at, cap, words[i]);
        at = put(buf, at, cap, ":");
        at = put_string(buf, at, cap, eq + 1);
        *eq = '=';
    }
    at = put(buf, at, cap, "}}");
    if (at >= cap) {
        fprintf(stderr, "sbecho: request too long\n");
        return -1;
    }
    buf[at] = 0;
    return (int)at;
}

/* ---- reading replies: a small JSON scanner for top-level members ------- */

static const char *skip_ws(const char *p) {
    while (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r') p++;
    return p;
}

static const char *skip_value(const char *p);

static const char *skip_string(const char *p) {
    if (*p != '"') return NULL;
    for (p++; *p && *p != '"'; p++)
        if (*p == '\\' && !*++p) return NULL;
    return *p == '"' ? p + 1 : NULL;
}

static const char *skip_container(const char *p, char close) {
    p = skip_ws(p + 1);
    if (*p == close) return p + 1;
    for (;;) {
        if (close == '}') {
            if (!(p = skip_string(p))) return NULL;
            p = skip_ws(p);
            if (*p++ != ':') return NULL;
        }
        if (!(p = skip_value(skip_ws(p)))) return NULL;
        p = skip_ws(p);
        if (*p == close) return p + 1;
        if (*p++ != ',') return NULL;
        p = skip_ws(p);
    }
}

static const char *skip_value(const char *p) {
    p = skip_ws(p);
    if (*p == '"') return skip_string(p);
    if (*p == '{') return skip_container(p, '}');
    if (*p == '[') return skip_container(p, ']');
    if (!*p) return NULL;
    while (*p && !strchr(",}] \t\r\n", *p)) p++; /* number, true, false, null */
    return p;
}

/* The value of top-level member KEY of the object at P, or NULL. */
static const char *member(const char *p, const char *key) {
    p = skip_ws(p);
    if (*p != '{') return NULL;
    p = skip_ws(p + 1);
    size_t klen = strlen(key);
    while (*p == '"') {
        const char *end = skip_string(p);
        if (!end) return NULL;
        int hit = (size_t)(end - p - 2) == klen && !memcmp(p + 1, key, klen);
        p = skip_ws(end);
        if (*p++ != ':') return NULL;
        p = skip_ws(p);
        if (hit) return p;
        if (!(p = skip_value(p))) return NULL;
        p = skip_ws(p);
        if (*p == ',') p = skip_ws(p + 1);
    }
    return NULL;
}

/* Copy the JSON string at P into OUT (escapes other than \" \\ \/ \n \t become '?'). */
static void string_at(const char *p, char *out, size_t cap) {
    size_t n = 0;
    if (!p || *p != '"') { snprintf(out, cap, "?"); return; }
    for (p++; *p && *p != '"' && n + 1 < cap; p++) {
        char c = *p;
        if (c == '\\') {
            c = *++p;
            c = c == 'n' ? '\n' : c == 't' ? '\t' : (c == '"' || c == '\\' || c == '/') ? c : '?';
        }
        out[n++] = c;
    }
    out[n] = 0;
}

/* ---- one message with at most one fd ----------------------------------- */

static int receive(int sock, char *buf, size_t cap, int *fd) {
    char control[CMSG_SPACE(8 * sizeof(int))];
    struct iovec iov = {buf, cap - 1};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1,
                         .msg_control = control, .msg_controllen = sizeof control};
    ssize_t n = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC);
    if (n <= 0) return -1;
    buf[n] = 0;
    *fd = -1;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
        if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
            int count = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
            int fds[8];
            memcpy(fds, CMSG_DATA(c), count * sizeof(int));
            for (int i = 0; i < count; i++) {
                if (*fd < 0) *fd = fds[i];
                else close(fds[i]);
            }
        }
    }
    return (int)n;
}

/* Send a request and wait for its reply; returns the reply's fd, -1 on failure.
 * With TIMEOUT, stores the reply's accept_timeout (seconds) there. */
static int call(int handle, const char *op, char **labels, int n, double *timeout) {
    static char buf[MAX_MESSAGE + 1];
    int len = build_request(buf, sizeof buf, op, labels, n);
    if (len < 0) return -1;
    if (send(handle, buf, (size_t)len, 0) != len) { perror("sbecho: send"); return -1; }
    int fd;
    if (receive(handle, buf, sizeof buf, &fd) < 0) {
        fprintf(stderr, "sbecho: the switchboard closed the handle\n");
        return -1;
    }
    const char *ok = member(buf, "ok");
    if (!ok || strncmp(ok, "true", 4)) {
        char code[64], message[1024];
        string_at(member(buf, "error"), code, sizeof code);
        string_at(member(buf, "message"), message, sizeof message);
        fprintf(stderr, "sbecho: %s: %s (%s)\n", op, message, code);
        if (fd >= 0) close(fd);
        return -1;
    }
    if (fd < 0) fprintf(stderr, "sbecho: %s: the reply carried no fd\n", op);
    if (timeout) {
        const char *t = member(buf, "accept_timeout");
        *timeout = t ? strtod(t, NULL) : 0;
    }
    return fd;
}

/* ---- the server's answer on a new connection ---------------------------- */

#define ACCEPT '\x06'
#define REFUSE '\x15'
#define MAX_REASON 1024

/* Wait up to TIMEOUT seconds for the server's answer on CONN: 1 accepted,
 * 0 the server went away before answering (try again), -1 refused or timed out. */
static int await_answer(int conn, double timeout) {
    struct pollfd p = {conn, POLLIN, 0};
    int ready = poll(&p, 1, (int)(timeout * 1000));
    char first = 0;
    ssize_t got = ready > 0 ? read(conn, &first, 1) : -1;
    if (ready == 0) {
        fprintf(stderr, "sbecho: the server did not accept within %g s (timeout)\n", timeout);
        return -1;
    }
    if (got == 1 && first == ACCEPT) return 1;
    if (got <= 0) return got == 0 || errno == ECONNRESET ? 0 : -1;
    if (first != REFUSE) {
        fprintf(stderr, "sbecho: the server answered 0x%02x (malformed)\n", (unsigned char)first);
        return -1;
    }
    char reason[MAX_REASON + 1];
    size_t have = 0;
    while (have < MAX_REASON && poll(&p, 1, (int)(timeout * 1000)) > 0) {
        ssize_t more = read(conn, reason + have, MAX_REASON - have);
        if (more <= 0) break;
        have += (size_t)more;
    }
    reason[have] = 0;
    fprintf(stderr, "sbecho: the server refused the connection: %s (refused)\n", reason);
    return -1;
}

/* ---- the two modes ----------------------------------------------------- */

static void probe_network(void) {
    int s = socket(AF_INET, SOCK_STREAM, 0);
    if (s < 0) {
        fprintf(stderr, "sbecho: no network of my own: socket(AF_INET): %s\n", strerror(errno));
        return;
    }
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(1)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    int r = connect(s, (struct sockaddr *)&a, sizeof a);
    fprintf(stderr, "sbecho: socket(AF_INET) worked; connect: %s\n", r ? strerror(errno) : "ok");
    close(s);
}

static int serve(int handle, char **labels, int n) {
    int listener = call(handle, "server_start", labels, n, NULL);
    if (listener < 0) return 1;
    close(handle);
    fprintf(stderr, "sbecho: serving\n");
    struct pollfd fds[1 + MAX_CONNECTIONS];
    int count = 1;
    fds[0] = (struct pollfd){listener, POLLIN, 0};
    static char buf[MAX_MESSAGE + 1];
    for (;;) {
        if (poll(fds, (nfds_t)count, -1) < 0) { perror("sbecho: poll"); return 1; }
        if (fds[0].revents) {
            int fd;
            if (receive(listener, buf, sizeof buf, &fd) < 0) {
                fprintf(stderr, "sbecho: the switchboard closed the listener\n");
                return 0;
            }
            const char *event = member(buf, "event");
            if (fd >= 0 && event && !strncmp(event, "\"connection\"", 12)) {
                /* The answer is the first byte on the connection itself. A
                 * client that already gave up makes it fail: drop that one. */
                static const char refusal[] = "\x15" "sbecho is serving too many connections";
                if (count == 1 + MAX_CONNECTIONS) {
                    send(fd, refusal, sizeof refusal - 1, MSG_NOSIGNAL);
                    close(fd);
                } else if (send(fd, "\x06", 1, MSG_NOSIGNAL) == 1) {
                    fds[count++] = (struct pollfd){fd, POLLIN, 0};
                } else {
                    close(fd);
                }
            } else if (fd >= 0) {
                close(fd);
            }
        }
        for (int i = 1; i < count; i++) {
            if (!fds[i].revents) continue;
            ssize_t got = read(fds[i].fd, buf, sizeof buf);
            if (got > 0 && send(fds[i].fd, buf, (size_t)got, MSG_NOSIGNAL) == got) continue;
            close(fds[i].fd); /* EOF or error: this connection is done */
            fds[i--] = fds[--count];
        }
    }
}

static int copy(int from, int to) {
    char buf[65536];
    ssize_t got = read(from, buf, sizeof buf);
    for (ssize_t at = 0; got > 0 && at < got;) {
        ssize_t put = write(to, buf + at, (size_t)(got - at));
        if (put <= 0) return -1;
        at += put;
    }
    return (int)got;
}

static int connect_mode(int handle, char **labels, int n) {
    int conn = -1;
    for (int attempt = 0; attempt < 3 && conn < 0; attempt++) {
        double timeout;
        conn = call(handle, "client_connect", labels, n, &timeout);
        if (conn < 0) return 1;
        int answer = await_answer(conn, timeout);
        if (answer < 0) return 1;
        if (answer == 0) { close(conn); conn = -1; } /* gone: the broker picks another */
    }
    if (conn < 0) {
        fprintf(stderr, "sbecho: the matching servers went away (unavailable)\n");
        return 1;
    }
    close(handle);
    struct pollfd fds[2] = {{conn, POLLIN, 0}, {0, POLLIN, 0}};
    for (;;) {
        if (poll(fds, 2, -1) < 0) { perror("sbecho: poll"); return 1; }
        if (fds[0].revents && copy(conn, 1) <= 0) return 0;
        if (fds[1].revents && copy(0, conn) <= 0) {
            shutdown(conn, SHUT_WR); /* stdin done: half-close, keep reading */
            fds[1].fd = -1;
        }
    }
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: sbecho serve|connect FD [-n] [NAME=VALUE...]\n");
        return 2;
    }
    int handle = atoi(argv[2]);
    int first = 3;
    if (argc > 3 && !strcmp(argv[3], "-n")) {
        probe_network();
        first = 4;
    }
    if (!strcmp(argv[1], "serve")) return serve(handle, argv + first, argc - first);
    if (!strcmp(argv[1], "connect")) return connect_mode(handle, argv + first, argc - first);
    fprintf(stderr, "sbecho: unknown mode %s\n", argv[1]);
    return 2;
}
