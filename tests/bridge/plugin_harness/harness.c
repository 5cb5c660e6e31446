/* The plugin's source with Mosquitto's functions stubbed, driven without a broker (tests/bridge/test_plugin_harness.py):
 *   harness ask SOCKET   a daemon that answers the first request late: one request, refused within the timeout,
 *                        the next CONNECT refused without asking, the late answer dropped (its session reported GONE)
 *   harness live SOCKET N  N sessions listed on a new events connection: every LIVE line and SYNCED arrive
 *   harness scan N       N sessions past their deadline: one tick kicks them all (and its time)
 *   harness kick         KICK <sid> of a session a newer CONNECT of its client id replaced kicks nothing
 *   harness late         late answers read strictly: only "<rid> OK <deadline> <sid>" makes a GONE
 * Prints key=value lines. */
#define _GNU_SOURCE /* memrchr, in the plugin */
#include <mosquitto.h>
#include <mosquitto_broker.h>
#include <mosquitto_plugin.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *stub_client_id = "";
static int kicks;
void *mosquitto_calloc(size_t a, size_t b) { return calloc(a, b); }
void mosquitto_free(void *p) { free(p); }
void *mosquitto_malloc(size_t n) { return malloc(n); }
void *mosquitto_realloc(void *p, size_t n) { return realloc(p, n); }
char *mosquitto_strdup(const char *s) { return strdup(s); }
void mosquitto_log_printf(int level, const char *fmt, ...)
{
    (void)level;
    va_list ap;
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
}
const char *mosquitto_client_address(const struct mosquitto *c) { (void)c; return "203.0.113.1"; }
const char *mosquitto_client_id(const struct mosquitto *c) { (void)c; return stub_client_id; }
bool mosquitto_client_clean_session(const struct mosquitto *c) { (void)c; return true; }
int mosquitto_kick_client_by_clientid(const char *id, bool with_will) { (void)id; (void)with_will; kicks++; return 0; }
int mosquitto_callback_register(mosquitto_plugin_id_t *i, int e, MOSQ_FUNC_generic_callback cb, const void *d,
                                void *u) { (void)i; (void)e; (void)cb; (void)d; (void)u; return 0; }
int mosquitto_callback_unregister(mosquitto_plugin_id_t *i, int e, MOSQ_FUNC_generic_callback cb, const void *d)
{ (void)i; (void)e; (void)cb; (void)d; return 0; }

#include "iotbridge_auth.c"

#define PREFIX "projects/p/locations/l/registries/r/devices/"

static double secs(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static int listen_on(const char *path)
{
    snprintf(sock_path, sizeof sock_path, "%s", path);
    unlink(path);
    int l = socket(AF_UNIX, SOCK_STREAM, 0);
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    snprintf(a.sun_path, sizeof a.sun_path, "%s", path);
    if (bind(l, (struct sockaddr *)&a, sizeof a) || listen(l, 8)) exit(2);
    return l;
}

static void setup(void)
{
    snprintf(prefix, sizeof prefix, PREFIX);
    prefix_len = strlen(prefix);
}

/* ------------------------------------------------------------------------------------------------- ask */
static int lfd, requests;
static void *daemon_thread(void *arg)
{
    (void)arg;
    int c = accept(lfd, NULL, NULL);
    char buf[4096];
    for (int i = 0;; i++) {
        ssize_t n = read(c, buf, sizeof buf - 1);
        if (n <= 0) return NULL;
        buf[n] = '\0';
        unsigned long long rid = strtoull(buf + 5, NULL, 10);
        requests++;
        if (i == 0) usleep(1500 * 1000); /* the first answer comes late */
        char answer[128];
        int m = snprintf(answer, sizeof answer, "%llu OK 4102444800 %d\n", rid, 100 + i);
        if (write(c, answer, (size_t)m) != m) return NULL;
    }
}

static int ask(const char *path)
{
    lfd = listen_on(path);
    int pair[2];
    socketpair(AF_UNIX, SOCK_STREAM, 0, pair);
    events_fd = pair[0]; /* an events connection, to see what the plugin tells the daemon */
    fcntl(events_fd, F_SETFL, O_NONBLOCK);
    pthread_t t;
    pthread_create(&t, NULL, daemon_thread, NULL);
    stub_client_id = PREFIX "dev-a";
    struct mosquitto_evt_basic_auth ed = {.client = (struct mosquitto *)0x1000, .password = "jwt"};
    double t0 = secs();
    int rc1 = on_basic_auth(MOSQ_EVT_BASIC_AUTH, &ed, NULL);
    double t1 = secs();
    int rc2 = on_basic_auth(MOSQ_EVT_BASIC_AUTH, &ed, NULL);
    double t2 = secs();
    printf("first_rc=%d first_s=%.3f requests_after_first=%d\n", rc1, t1 - t0, requests);
    printf("second_rc=%d second_s=%.3f requests_after_second=%d\n", rc2, t2 - t1, requests);
    sleep(2); /* the late answer has come, the refusal second has passed */
    ed.client = (struct mosquitto *)0x2000;
    int rc3 = on_basic_auth(MOSQ_EVT_BASIC_AUTH, &ed, NULL);
    struct session *s = session_of(ed.client);
    printf("third_rc=%d third_sid=%llu requests=%d\n", rc3, s ? s->sid : 0ULL, requests);
    char first[64] = "";
    const char *nl = out_len ? memchr(out_buf, '\n', out_len) : NULL;
    if (nl) snprintf(first, sizeof first, "%.*s", (int)(nl - out_buf), out_buf);
    printf("events_gone=%s\n", strncmp(first, "GONE ", 5) == 0 ? first + 5 : "none"); /* the daemon is told */
    return 0;
}

/* ------------------------------------------------------------------------------------------------- live */
static int live(const char *path, int n)
{
    setup();
    int l = listen_on(path);
    char id[300];
    for (int i = 0; i < n; i++) {
        snprintf(id, sizeof id, PREFIX "device-%08d-with-a-longer-name", i);
        session_add((struct mosquitto *)(uintptr_t)(0x100000 + 0x800 * (uintptr_t)i), id, 1000 + (unsigned)i,
                    time(NULL) + 3600);
    }
    double t0 = secs();
    events_connect();
    int c = accept(l, NULL, NULL);
    fcntl(c, F_SETFL, O_NONBLOCK);
    static char buf[1 << 16];
    char tail[8] = {0};
    size_t bytes = 0;
    int lives = 0, synced = 0;
    while (!synced && secs() - t0 < 20) {
        events_stream(); /* as on the tick */
        events_flush();
        ssize_t r;
        while ((r = read(c, buf, sizeof buf)) > 0) {
            bytes += (size_t)r;
            for (ssize_t i = 0; i < r; i++) {
                memmove(tail, tail + 1, sizeof tail - 2);
                tail[sizeof tail - 2] = buf[i];
                if (strncmp(tail + 2, "\nLIVE", 5) == 0) lives++;
                if (strcmp(tail, "SYNCED\n") == 0) synced = 1;
            }
        }
    }
    printf("lives=%d synced=%d bytes=%zu reset=%d seconds=%.3f\n", lives + 0, synced, bytes, events_reset,
           secs() - t0);
    return 0;
}

/* ------------------------------------------------------------------------------------------------- scan */
static int scan(int n)
{
    setup();
    char id[300];
    time_t now = time(NULL);
    for (int i = 0; i < n; i++) {
        snprintf(id, sizeof id, PREFIX "device-%08d", i);
        session_add((struct mosquitto *)(uintptr_t)(0x100000 + 0x800 * (uintptr_t)i), id, 1000 + (unsigned)i, now);
    }
    struct mosquitto_evt_tick t = {.now_s = now + 1};
    double t0 = secs();
    on_tick(MOSQ_EVT_TICK, &t, NULL);
    printf("kicks=%d seconds=%.3f\n", kicks, secs() - t0);
    return 0;
}

/* ------------------------------------------------------------------------------------------------- kick */
static int kick_replaced(void)
{
    setup();
    session_add((struct mosquitto *)0x1000, PREFIX "dev-a", 1, time(NULL) + 3600);
    session_add((struct mosquitto *)0x2000, PREFIX "dev-a", 2, time(NULL) + 3600); /* the same client id, later */
    kick_sid("1");
    printf("kicks_for_replaced=%d\n", kicks);
    kick_sid("2");
    printf("kicks_for_current=%d\n", kicks);
    return 0;
}

/* ------------------------------------------------------------------------------------------------- late */
static int late(void)
{
    events_fd = 1000; /* a connection as far as events_append is concerned: nothing is written to it */
    const char *lines[] = {"7 OK 1900000000 123", "8 NO JWT alg 'x OK y' refused; allowed: ['ES256', 'RS256']",
                           "9 NO device 'a OK 1 2'", "10 OK 1900000000", "11 OK 1900000000 12x", "x OK 1 2",
                           "12 OK 1900000000 456"};
    for (size_t i = 0; i < sizeof lines / sizeof *lines; i++) late_answer(lines[i]);
    printf("events=");
    for (size_t i = 0; i < out_len; i++) putchar(out_buf[i] == '\n' ? ';' : out_buf[i] == ' ' ? ':' : out_buf[i]);
    putchar('\n');
    return 0;
}

int main(int argc, char **argv)
{
    setup();
    if (argc == 3 && strcmp(argv[1], "ask") == 0) return ask(argv[2]);
    if (argc == 4 && strcmp(argv[1], "live") == 0) return live(argv[2], atoi(argv[3]));
    if (argc == 3 && strcmp(argv[1], "scan") == 0) return scan(atoi(argv[2]));
    if (argc == 2 && strcmp(argv[1], "kick") == 0) return kick_replaced();
    if (argc == 2 && strcmp(argv[1], "late") == 0) return late();
    fprintf(stderr, "usage: harness ask SOCKET | live SOCKET N | scan N | kick | late\n");
    return 2;
}
