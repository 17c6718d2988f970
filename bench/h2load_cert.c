/* A client certificate for h2load, which has no option for one.
 *
 * h2load (nghttp2-client 1.52 in Debian 12) takes no --cert or --key, unlike its sibling nghttp. OpenSSL's
 * configuration file cannot add one either: it refuses the Certificate and PrivateKey commands in the
 * system_default section, which applies to contexts the program did not configure itself. So the benchmark loads
 * this library into h2load with LD_PRELOAD. It wraps SSL_CTX_new: every context h2load makes gets the certificate
 * chain named by H2LOAD_CLIENT_CERT and the key named by H2LOAD_CLIENT_KEY (PEM files), as nghttp's --cert and
 * --key would load them, and OpenSSL answers the server's CertificateRequest with them. Nothing else of h2load
 * changes: its connections, streams, HPACK and TLS records are its own.
 *
 * Without the two variables the wrapper only passes the call on. A file that cannot be loaded ends h2load (exit
 * 3) rather than letting it run without a certificate. The harness also checks the result: the HTTP/2 port
 * requires a certificate, so without one no request succeeds, and the backend counts the requests that arrive
 * with the peer's certificate header.
 *
 * Built by bench/loads.py (h2load_preload): cc -shared -fPIC -O2 -o h2load_cert.so h2load_cert.c -ldl
 * No OpenSSL headers are needed: the wrapper only passes pointers through.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>

typedef struct ssl_ctx_st SSL_CTX;
typedef struct ssl_method_st SSL_METHOD;

enum { FILETYPE_PEM = 1 }; /* SSL_FILETYPE_PEM in openssl/ssl.h */

static void *next(const char *name) {
    void *found = dlsym(RTLD_NEXT, name);
    if (found == NULL) {
        fprintf(stderr, "h2load_cert: %s not found: is h2load linked with OpenSSL's libssl?\n", name);
        exit(3);
    }
    return found;
}

SSL_CTX *SSL_CTX_new(const SSL_METHOD *method) {
    SSL_CTX *(*ctx_new)(const SSL_METHOD *) = (SSL_CTX * (*)(const SSL_METHOD *)) next("SSL_CTX_new");
    SSL_CTX *ctx = ctx_new(method);
    const char *cert = getenv("H2LOAD_CLIENT_CERT");
    const char *key = getenv("H2LOAD_CLIENT_KEY");
    if (ctx == NULL || cert == NULL || key == NULL) {
        return ctx;
    }
    int (*use_chain)(SSL_CTX *, const char *) =
        (int (*)(SSL_CTX *, const char *))next("SSL_CTX_use_certificate_chain_file");
    int (*use_key)(SSL_CTX *, const char *, int) =
        (int (*)(SSL_CTX *, const char *, int))next("SSL_CTX_use_PrivateKey_file");
    int (*check_key)(const SSL_CTX *) = (int (*)(const SSL_CTX *))next("SSL_CTX_check_private_key");
    if (use_chain(ctx, cert) != 1 || use_key(ctx, key, FILETYPE_PEM) != 1 || check_key(ctx) != 1) {
        fprintf(stderr, "h2load_cert: cannot load the client certificate %s with the key %s\n", cert, key);
        exit(3);
    }
    return ctx;
}
