/*
 * relay_floor: the least any switchboard broker must do per connection, as a
 * floor reference for bench/switchboard.py. It speaks just enough of
 * protocol version 2 (docs/switchboard.md) for the Python client library:
 * one server_start, then client_connect requests, each answered by making a
 * socketpair, sending one end to the (single) server and the other to the
 * client. No labels, no rights, no validation, no balancing: not a broker.
 *
 *   relay_floor PATH      listen on PATH (SOCK_SEQPACKET), serve until killed
 *
 * Build: cc -O2 -o relay_floor relay_floor.c
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

static int send_fd(int sock, const char *msg, int fd) {
    char control[CMSG_SPACE(sizeof(int))];
    struct iovec iov = {(void *)msg, strlen(msg)};
    struct msghdr m = {.msg_iov = &iov, .msg_iovlen = 1,
                       .msg_control = control, .msg_controllen = sizeof control};
    struct cmsghdr *c = CMSG_FIRSTHDR(&m);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(c), &fd, sizeof fd);
    return sendmsg(sock, &m, MSG_NOSIGNAL) < 0 ? -1 : 0;
}

/* The digits of "id":N in a request ("0" when absent). */
static void request_id(const char *req, char *out, size_t cap) {
    const char *p = strstr(req, "\"id\":");
    size_t n = 0;
    if (p)
        for (p += 5; n + 1 < cap && *p >= '0' && *p <= '9'; p++) out[n++] = *p;
    if (!n) out[n++] = '0';
    out[n] = 0;
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: relay_floor PATH\n");
        return 2;
    }
    int root = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    strncpy(addr.sun_path, argv[1], sizeof addr.sun_path - 1);
    unlink(argv[1]);
    if (bind(root, (struct sockaddr *)&addr, sizeof addr) || listen(root, 128)) {
        perror("relay_floor");
        return 1;
    }
    int ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = root};
    epoll_ctl(ep, EPOLL_CTL_ADD, root, &ev);
    printf("serving\n");
    fflush(stdout);
    int listener = -1;
    static char buf[65537];
    for (;;) {
        struct epoll_event ready[16];
        int n = epoll_wait(ep, ready, 16, -1);
        for (int i = 0; i < n; i++) {
            int fd = ready[i].data.fd;
            if (fd == root) {
                int h = accept4(root, NULL, NULL, SOCK_CLOEXEC);
                struct epoll_event hev = {.events = EPOLLIN, .data.fd = h};
                if (h >= 0) epoll_ctl(ep, EPOLL_CTL_ADD, h, &hev);
                continue;
            }
            ssize_t got = recv(fd, buf, sizeof buf - 1, 0);
            if (got <= 0) {
                close(fd);
                continue;
            }
            buf[got] = 0;
            char id[32], reply[160];
            request_id(buf, id, sizeof id);
            int server_start = strstr(buf, "\"server_start\"") != NULL;
            int sv[2];
            if (socketpair(AF_UNIX, (server_start ? SOCK_SEQPACKET : SOCK_STREAM) | SOCK_CLOEXEC,
                           0, sv))
                return 1;
            if (server_start) {
                listener = sv[0];
                snprintf(reply, sizeof reply, "{\"v\":2,\"id\":%s,\"ok\":true,\"labels\":{}}", id);
                send_fd(fd, reply, sv[1]);
                close(sv[1]);
                continue;
            }
            send_fd(listener, "{\"v\":2,\"event\":\"connection\",\"labels\":{}}", sv[1]);
            snprintf(reply, sizeof reply,
                     "{\"v\":2,\"id\":%s,\"ok\":true,\"labels\":{},\"accept_timeout\":5}", id);
            send_fd(fd, reply, sv[0]);
            close(sv[0]);
            close(sv[1]);
        }
    }
}
