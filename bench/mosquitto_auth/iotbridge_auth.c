/* A bench prototype, not deployed: Mosquitto 2.0 (plugin interface 5) authenticating IoT Core devices itself with
 * OpenSSL, the C-only ceiling of the design where Mosquitto terminates TLS (docs/broker-scaling.md, "Connection
 * rate: the designs measured"). The design built, with an auth daemon, is the product's plugin
 * (iotbridge/bridge/mosquitto_plugin). Built at bench time by bench/mosquitto_auth/__init__.py.
 *
 * MOSQ_EVT_BASIC_AUTH: the client id must be PREFIX + a device id (PREFIX is
 * projects/P/locations/L/registries/R/devices/); the username is ignored; the password is the device's JWT,
 *   checked here with OpenSSL (ES256 or RS256) against the device's public keys,
 *     the PEM file plugin_opt_keydir/DEVICE.pem (every key registered for it, written by write_keys), parsed on
 *     the device's first CONNECT and kept; plugin_opt_audience is the project. The claims checked: aud, iat,
 *     exp (ahead of now), exp - iat <= 24 h, iat no more than 10 min ahead.
 * MOSQ_EVT_ACL_CHECK: a device publishes only /devices/ID/events[/...] and /devices/ID/state (QoS <= 1), subscribes
 * only /devices/ID/config and /devices/ID/commands/# (or a sub-folder of commands), receives only those.
 */
#include <ctype.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <openssl/bn.h>
#include <openssl/ecdsa.h>
#include <openssl/evp.h>
#include <openssl/pem.h>

#include <mosquitto.h>
#include <mosquitto_broker.h>
#include <mosquitto_plugin.h>

#define MAX_LIFETIME_S (24 * 3600)
#define CLOCK_SKEW_S 600
#define KEY_BUCKETS 65536
#define MAX_KEYS 3

static mosquitto_plugin_id_t *plugin_id;
static char prefix[512];
static size_t prefix_len;
static char keydir[400];
static char audience[256];

/* ----------------------------------------------------------------------------------------- the client id */

/* The device id of a client id PREFIX + ID, or NULL; the id as the registry's DEVICE_ID_RE: a letter, then 2 to
 * 254 of letters, digits and _ . ~ % - */
static const char *device_of(const char *client_id)
{
    if (!client_id || strncmp(client_id, prefix, prefix_len) != 0) return NULL;
    const char *id = client_id + prefix_len;
    size_t n = strlen(id);
    if (n < 3 || n > 255 || !isalpha((unsigned char)id[0])) return NULL;
    for (size_t i = 1; i < n; i++) {
        unsigned char c = (unsigned char)id[i];
        if (!isalnum(c) && !strchr("_.~%-", c)) return NULL;
    }
    return id;
}

/* ----------------------------------------------------------------------------------- the OpenSSL variant */

struct keys {
    struct keys *next;
    char *device;
    int n;
    EVP_PKEY *key[MAX_KEYS];
};
static struct keys *buckets[KEY_BUCKETS];

static unsigned hash(const char *s)
{
    unsigned h = 2166136261u;
    while (*s) h = (h ^ (unsigned char)*s++) * 16777619u;
    return h % KEY_BUCKETS;
}

static struct keys *keys_of(const char *device)
{
    unsigned h = hash(device);
    for (struct keys *k = buckets[h]; k; k = k->next)
        if (strcmp(k->device, device) == 0) return k;
    char path[800];
    snprintf(path, sizeof path, "%s/%s.pem", keydir, device);
    FILE *f = fopen(path, "r");
    if (!f) return NULL; /* not registered (not cached: a device registered later is found then) */
    struct keys *k = calloc(1, sizeof *k);
    k->device = strdup(device);
    EVP_PKEY *key;
    while (k->n < MAX_KEYS && (key = PEM_read_PUBKEY(f, NULL, NULL, NULL)) != NULL) k->key[k->n++] = key;
    fclose(f);
    k->next = buckets[h];
    buckets[h] = k;
    return k;
}

static int b64url_value(char c)
{
    if (c >= 'A' && c <= 'Z') return c - 'A';
    if (c >= 'a' && c <= 'z') return c - 'a' + 26;
    if (c >= '0' && c <= '9') return c - '0' + 52;
    if (c == '-') return 62;
    if (c == '_') return 63;
    return -1;
}

/* base64url without padding; the decoded length, or -1 */
static long b64url_decode(const char *in, size_t n, unsigned char *out, size_t cap)
{
    size_t o = 0;
    unsigned acc = 0;
    int bits = 0;
    for (size_t i = 0; i < n; i++) {
        int v = b64url_value(in[i]);
        if (v < 0) return -1;
        acc = (acc << 6) | (unsigned)v;
        bits += 6;
        if (bits >= 8) {
            bits -= 8;
            if (o >= cap) return -1;
            out[o++] = (unsigned char)(acc >> bits);
        }
    }
    return (long)o;
}

/* The value of "name" in a flat JSON object: a string into str (when str) or a number into num. A prototype's
 * reader: no escapes in the strings it compares, no nesting in a device token's header and claims. */
static bool json_field(const char *json, const char *name, char *str, size_t cap, double *num)
{
    char pat[64];
    snprintf(pat, sizeof pat, "\"%s\"", name);
    const char *p = strstr(json, pat);
    if (!p) return false;
    p += strlen(pat);
    while (isspace((unsigned char)*p)) p++;
    if (*p++ != ':') return false;
    while (isspace((unsigned char)*p)) p++;
    if (str) {
        if (*p++ != '"') return false;
        size_t i = 0;
        while (*p && *p != '"' && *p != '\\' && i + 1 < cap) str[i++] = *p++;
        if (*p != '"') return false;
        str[i] = '\0';
        return true;
    }
    char *end;
    *num = strtod(p, &end);
    return end != p;
}

static bool verify_sig(EVP_PKEY *key, bool es256, const unsigned char *msg, size_t n, const unsigned char *sig,
                       size_t sig_n)
{
    unsigned char der[80];
    const unsigned char *use = sig;
    size_t use_n = sig_n;
    if (es256) { /* JWS: r || s, 32 bytes each; OpenSSL wants DER */
        if (sig_n != 64 || EVP_PKEY_base_id(key) != EVP_PKEY_EC) return false;
        ECDSA_SIG *s = ECDSA_SIG_new();
        ECDSA_SIG_set0(s, BN_bin2bn(sig, 32, NULL), BN_bin2bn(sig + 32, 32, NULL));
        unsigned char *p = der;
        int len = i2d_ECDSA_SIG(s, &p);
        ECDSA_SIG_free(s);
        if (len <= 0) return false;
        use = der;
        use_n = (size_t)len;
    } else if (EVP_PKEY_base_id(key) != EVP_PKEY_RSA) {
        return false;
    }
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    bool ok = EVP_DigestVerifyInit(ctx, NULL, EVP_sha256(), NULL, key) == 1 &&
              EVP_DigestVerify(ctx, use, use_n, msg, n) == 1;
    EVP_MD_CTX_free(ctx);
    return ok;
}

static const char *openssl_check(const char *device, const char *token)
{
    const char *dot1 = strchr(token, '.');
    const char *dot2 = dot1 ? strchr(dot1 + 1, '.') : NULL;
    if (!dot2 || strchr(dot2 + 1, '.')) return "password is not a JWT";
    char header[512], claims[2048];
    unsigned char sig[600];
    long hn = b64url_decode(token, (size_t)(dot1 - token), (unsigned char *)header, sizeof header - 1);
    long cn = b64url_decode(dot1 + 1, (size_t)(dot2 - dot1 - 1), (unsigned char *)claims, sizeof claims - 1);
    long sn = b64url_decode(dot2 + 1, strlen(dot2 + 1), sig, sizeof sig);
    if (hn < 0 || cn < 0 || sn < 0) return "password is not a JWT";
    header[hn] = claims[cn] = '\0';
    char alg[16], aud[256];
    if (!json_field(header, "alg", alg, sizeof alg, NULL)) return "password is not a JWT";
    bool es256 = strcmp(alg, "ES256") == 0;
    if (!es256 && strcmp(alg, "RS256") != 0) return "JWT alg refused";
    double iat, exp;
    if (!json_field(claims, "aud", aud, sizeof aud, NULL) || !json_field(claims, "iat", NULL, 0, &iat) ||
        !json_field(claims, "exp", NULL, 0, &exp))
        return "JWT claims missing";
    struct keys *k = keys_of(device);
    if (!k || k->n == 0) return "no credential registered";
    bool signed_ok = false;
    for (int i = 0; i < k->n && !signed_ok; i++)
        signed_ok = verify_sig(k->key[i], es256, (const unsigned char *)token, (size_t)(dot2 - token), sig,
                               (size_t)sn);
    if (!signed_ok) return "JWT signature does not match any registered credential";
    if (strcmp(aud, audience) != 0) return "JWT aud is not this project";
    double now = (double)time(NULL);
    if (exp - iat > MAX_LIFETIME_S) return "JWT lifetime exp - iat exceeds 24 h";
    if (exp <= iat) return "JWT exp is not after iat";
    if (iat > now + CLOCK_SKEW_S) return "JWT iat lies in the future";
    if (exp <= now) return "JWT expired";
    return NULL;
}

/* ------------------------------------------------------------------------------------------- the events */

static int on_basic_auth(int event, void *event_data, void *userdata)
{
    (void)event;
    (void)userdata;
    struct mosquitto_evt_basic_auth *ed = event_data;
    const char *client_id = mosquitto_client_id(ed->client);
    const char *device = device_of(client_id);
    if (!device || !ed->password || !ed->password[0]) return MOSQ_ERR_AUTH;
    const char *why = openssl_check(device, ed->password);
    if (why) mosquitto_log_printf(MOSQ_LOG_INFO, "iotbridge_auth: %s refused: %s", device, why);
    return why ? MOSQ_ERR_AUTH : MOSQ_ERR_SUCCESS;
}

/* Whether topic is /devices/DEVICE/WHAT, or (sub) /devices/DEVICE/WHAT/... */
static bool topic_is(const char *topic, const char *device, const char *what, bool sub)
{
    size_t dn = strlen(device), wn = strlen(what);
    if (strncmp(topic, "/devices/", 9) != 0 || strncmp(topic + 9, device, dn) != 0 || topic[9 + dn] != '/')
        return false;
    const char *rest = topic + 10 + dn;
    if (strncmp(rest, what, wn) != 0) return false;
    return rest[wn] == '\0' || (sub && rest[wn] == '/' && rest[wn + 1] != '\0');
}

static int on_acl_check(int event, void *event_data, void *userdata)
{
    (void)event;
    (void)userdata;
    struct mosquitto_evt_acl_check *ed = event_data;
    const char *device = device_of(mosquitto_client_id(ed->client));
    const char *t = ed->topic;
    if (!device || !t) return MOSQ_ERR_ACL_DENIED;
    switch (ed->access) {
    case MOSQ_ACL_WRITE:
        if (ed->qos > 1 || strpbrk(t, "+#")) return MOSQ_ERR_ACL_DENIED;
        return topic_is(t, device, "events", true) || topic_is(t, device, "state", false) ? MOSQ_ERR_SUCCESS
                                                                                          : MOSQ_ERR_ACL_DENIED;
    case MOSQ_ACL_SUBSCRIBE:
    case MOSQ_ACL_UNSUBSCRIBE: {
        if (topic_is(t, device, "config", false) || topic_is(t, device, "commands/#", false)) return MOSQ_ERR_SUCCESS;
        return topic_is(t, device, "commands", true) && !strpbrk(t, "+#") ? MOSQ_ERR_SUCCESS : MOSQ_ERR_ACL_DENIED;
    }
    case MOSQ_ACL_READ:
        return topic_is(t, device, "config", false) || topic_is(t, device, "commands", true) ? MOSQ_ERR_SUCCESS
                                                                                             : MOSQ_ERR_ACL_DENIED;
    default:
        return MOSQ_ERR_ACL_DENIED;
    }
}

/* ------------------------------------------------------------------------------------ the plugin interface */

int mosquitto_plugin_version(int supported_version_count, const int *supported_versions)
{
    for (int i = 0; i < supported_version_count; i++)
        if (supported_versions[i] == 5) return 5;
    return -1;
}

int mosquitto_plugin_init(mosquitto_plugin_id_t *identifier, void **userdata, struct mosquitto_opt *opts,
                          int opt_count)
{
    (void)userdata;
    plugin_id = identifier;
    for (int i = 0; i < opt_count; i++) {
        const char *k = opts[i].key, *v = opts[i].value;
        if (strcmp(k, "client_id_prefix") == 0) snprintf(prefix, sizeof prefix, "%s", v);
        else if (strcmp(k, "keydir") == 0) snprintf(keydir, sizeof keydir, "%s", v);
        else if (strcmp(k, "audience") == 0) snprintf(audience, sizeof audience, "%s", v);
    }
    prefix_len = strlen(prefix);
    if (!prefix_len || !keydir[0] || !audience[0]) {
        mosquitto_log_printf(MOSQ_LOG_ERR, "iotbridge_auth (bench): needs client_id_prefix, keydir and audience");
        return MOSQ_ERR_INVAL;
    }
    if (mosquitto_callback_register(plugin_id, MOSQ_EVT_BASIC_AUTH, on_basic_auth, NULL, NULL) ||
        mosquitto_callback_register(plugin_id, MOSQ_EVT_ACL_CHECK, on_acl_check, NULL, NULL))
        return MOSQ_ERR_UNKNOWN;
    return MOSQ_ERR_SUCCESS;
}

int mosquitto_plugin_cleanup(void *userdata, struct mosquitto_opt *opts, int opt_count)
{
    (void)userdata;
    (void)opts;
    (void)opt_count;
    mosquitto_callback_unregister(plugin_id, MOSQ_EVT_BASIC_AUTH, on_basic_auth, NULL);
    mosquitto_callback_unregister(plugin_id, MOSQ_EVT_ACL_CHECK, on_acl_check, NULL);
    return MOSQ_ERR_SUCCESS;
}
