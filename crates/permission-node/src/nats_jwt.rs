//! The NATS side of the auth callout: the authorization request the server sends (a JWT it
//! signs with its server nkey) and the answer we sign with the callout's account nkey (an
//! authorization response carrying a user JWT with the connection's permissions and expiry).
//!
//! NATS JWTs are ordinary compact JWS with `alg: ed25519-nkey`: base64url (no padding) of the
//! header and the claims, then of the Ed25519 signature over `header.claims`. The field names
//! follow nats-io/jwt v2 (`nats.pub`, `nats.sub`, `nats.jwt`, `nats.error`).

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use nkeys::KeyPair;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::access::Permissions;

const HEADER: &str = r#"{"typ":"JWT","alg":"ed25519-nkey"}"#;

/// What the callout needs of the server's request.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct AuthRequest {
    /// The server that asks (its public nkey is the response's audience).
    pub server_id: ServerId,
    /// The public nkey the server made for this connection: the user JWT's subject.
    pub user_nkey: String,
    pub client_info: ClientInfo,
    pub connect_opts: ConnectOpts,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct ServerId {
    pub id: String,
    pub name: String,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct ClientInfo {
    pub host: String,
    /// The connection id on that server (what `$SYS.REQ.SERVER.<id>.KICK` takes).
    pub id: u64,
    pub name: String,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct ConnectOpts {
    /// The client's `auth_token`: a tether token.
    pub auth_token: Option<String>,
    pub user: Option<String>,
    pub name: Option<String>,
}

/// Decodes and checks the server's request: well formed, signed by the server key it names
/// (`iss`), of type `authorization_request`, not expired.
pub fn decode_request(jwt: &str, now: i64) -> Result<AuthRequest, String> {
    let (claims, _) = decode_signed(jwt)?;
    if claims["nats"]["type"] != "authorization_request" {
        return Err("not an authorization request".into());
    }
    if let Some(exp) = claims["exp"].as_i64()
        && exp < now
    {
        return Err("authorization request expired".into());
    }
    serde_json::from_value(claims["nats"].clone()).map_err(|e| format!("bad request claims: {e}"))
}

/// A user JWT for `user_nkey` in `account`, named `name`, valid until `exp`, with `perms`.
pub fn user_jwt(
    issuer: &KeyPair,
    user_nkey: &str,
    name: &str,
    account: &str,
    perms: &Permissions,
    exp: i64,
    now: i64,
) -> Result<String, String> {
    let mut claims = json!({
        "jti": uuid::Uuid::new_v4().simple().to_string(),
        "iat": now,
        "exp": exp,
        "iss": issuer.public_key(),
        "name": name,
        "sub": user_nkey,
        "aud": account,
        "nats": {
            "pub": perms.publish,
            "sub": perms.subscribe,
            "subs": -1,
            "data": -1,
            "payload": -1,
            "type": "user",
            "version": 2,
        },
    });
    if let Some(window) = perms.stream_responses {
        // Any number of answers (`max` -1) to each request received, for `ttl` nanoseconds.
        // The server then denies every other publish even with an empty allow list.
        claims["nats"]["resp"] = json!({
            "max": -1,
            "ttl": u64::try_from(window.as_nanos()).unwrap_or(u64::MAX),
        });
    }
    sign(issuer, &claims)
}

/// The signed answer to `req`: the user JWT, or the reason the connection is refused.
pub fn response_jwt(
    issuer: &KeyPair,
    req: &AuthRequest,
    outcome: Result<String, String>,
    now: i64,
) -> Result<String, String> {
    let mut nats = json!({"type": "authorization_response", "version": 2});
    match outcome {
        Ok(user) => nats["jwt"] = Value::String(user),
        Err(reason) => nats["error"] = Value::String(reason),
    }
    let claims = json!({
        "jti": uuid::Uuid::new_v4().simple().to_string(),
        "iat": now,
        "iss": issuer.public_key(),
        "sub": req.user_nkey,
        "aud": req.server_id.id,
        "nats": nats,
    });
    sign(issuer, &claims)
}

fn sign(key: &KeyPair, claims: &Value) -> Result<String, String> {
    let body = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(HEADER),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let sig = key.sign(body.as_bytes()).map_err(|e| e.to_string())?;
    Ok(format!("{body}.{}", URL_SAFE_NO_PAD.encode(sig)))
}

/// The claims of a NATS JWT whose signature checks out against its own `iss`, and that `iss`.
fn decode_signed(jwt: &str) -> Result<(Value, String), String> {
    let mut parts = jwt.trim().split('.');
    let (Some(h), Some(c), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err("expected three dot-separated parts".into());
    };
    let b64 = |p: &str| {
        URL_SAFE_NO_PAD
            .decode(p.trim_end_matches('='))
            .map_err(|_| "not base64url")
    };
    let header: Value = serde_json::from_slice(&b64(h)?).map_err(|_| "header is not JSON")?;
    let alg = header["alg"]
        .as_str()
        .unwrap_or_default()
        .to_ascii_lowercase();
    if !alg.starts_with("ed25519") {
        return Err(format!("algorithm `{alg}` is not accepted"));
    }
    let claims: Value = serde_json::from_slice(&b64(c)?).map_err(|_| "claims are not JSON")?;
    let iss = claims["iss"].as_str().unwrap_or_default().to_string();
    let key = KeyPair::from_public_key(&iss).map_err(|_| "issuer is not a public nkey")?;
    key.verify(format!("{h}.{c}").as_bytes(), &b64(s)?)
        .map_err(|_| "bad signature".to_string())?;
    Ok((claims, iss))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request_from(server: &KeyPair, nats: Value) -> String {
        sign(
            server,
            &json!({"iss": server.public_key(), "aud": "nats-authorization-request", "exp": 100, "nats": nats}),
        )
        .expect("test value")
    }

    #[test]
    fn a_signed_request_decodes_and_a_tampered_one_does_not() {
        let server = KeyPair::new_server();
        let jwt = request_from(
            &server,
            json!({"type": "authorization_request", "user_nkey": "UABC", "server_id": {"id": server.public_key()},
                   "client_info": {"id": 7, "host": "127.0.0.1"}, "connect_opts": {"auth_token": "tok", "protocol": 1}}),
        );
        let r = decode_request(&jwt, 50).expect("test value");
        assert_eq!(r.user_nkey, "UABC");
        assert_eq!(r.client_info.id, 7);
        assert_eq!(r.connect_opts.auth_token.as_deref(), Some("tok"));
        assert!(
            decode_request(&jwt, 101)
                .expect_err("refused")
                .contains("expired")
        );

        let mut parts: Vec<&str> = jwt.split('.').collect();
        let forged = URL_SAFE_NO_PAD.encode(
            json!({"iss": server.public_key(), "nats": {"type": "authorization_request", "user_nkey": "UEVIL"}})
                .to_string(),
        );
        parts[1] = &forged;
        assert_eq!(
            decode_request(&parts.join("."), 50).expect_err("refused"),
            "bad signature"
        );
        assert!(decode_request("a.b", 50).is_err());
    }

    #[test]
    fn the_response_carries_the_user_and_is_signed_by_the_issuer() {
        let issuer = KeyPair::new_account();
        let req = AuthRequest {
            user_nkey: "UXYZ".into(),
            server_id: ServerId {
                id: "NSERVER".into(),
                ..Default::default()
            },
            ..Default::default()
        };
        let user = user_jwt(
            &issuer,
            "UXYZ",
            "alice",
            "TETHER",
            &Permissions::everything(),
            200,
            100,
        )
        .expect("test value");
        let (u, iss) = decode_signed(&user).expect("test value");
        assert_eq!(iss, issuer.public_key());
        assert_eq!(u["aud"], "TETHER");
        assert_eq!(u["exp"], 200);
        assert_eq!(u["nats"]["pub"]["allow"][0], ">");
        let resp = response_jwt(&issuer, &req, Ok(user.clone()), 100).expect("test value");
        let (r, _) = decode_signed(&resp).expect("test value");
        assert_eq!(r["aud"], "NSERVER");
        assert_eq!(r["sub"], "UXYZ");
        assert_eq!(r["nats"]["jwt"], user.as_str());
        let refused =
            response_jwt(&issuer, &req, Err("token expired".into()), 100).expect("test value");
        assert_eq!(
            decode_signed(&refused).expect("test value").0["nats"]["error"],
            "token expired"
        );
    }
}
