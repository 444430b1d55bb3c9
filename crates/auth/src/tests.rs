use super::*;

const NOW: i64 = 1_800_000_000;

fn val() -> Validation {
    Validation {
        issuer: "tether".into(),
        audience: "tether".into(),
        leeway_secs: 30,
    }
}

fn setup() -> (SigningKey, KeySet) {
    let k = SigningKey::generate().expect("key");
    let mut s = KeySet::default();
    s.insert(k.public_key()).expect("insert");
    (k, s)
}

fn claims(now: i64, ttl: u64) -> Claims {
    Claims::new(
        "tether",
        "tether",
        "agent-1",
        "space-1",
        [Scope::ShellExec].into_iter().collect(),
        now,
        ttl,
    )
}

fn b64(v: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(v)
}

fn parts(t: &str) -> Vec<String> {
    t.split('.').map(str::to_string).collect()
}

#[test]
fn round_trip() {
    let (k, s) = setup();
    let c = claims(NOW, 300);
    let t = k.sign(&c).expect("sign");
    assert_eq!(verify(&t, &s, &val(), NOW + 10).expect("valid"), c);
}

#[test]
fn time_checks_with_leeway() {
    let (k, s) = setup();
    let t = k.sign(&claims(NOW, 300)).expect("sign");
    assert!(
        verify(&t, &s, &val(), NOW + 300 + 29).is_ok(),
        "inside leeway"
    );
    assert_eq!(
        verify(&t, &s, &val(), NOW + 300 + 31),
        Err(AuthError::Expired)
    );
    assert!(
        verify(&t, &s, &val(), NOW - 29).is_ok(),
        "clock skew tolerated"
    );
    assert_eq!(
        verify(&t, &s, &val(), NOW - 31),
        Err(AuthError::NotYetValid)
    );
}

#[test]
fn issuer_and_audience() {
    let (k, s) = setup();
    let mut c = claims(NOW, 300);
    c.aud = "other".into();
    assert_eq!(
        verify(&k.sign(&c).expect("sign"), &s, &val(), NOW),
        Err(AuthError::WrongAudience)
    );
    let mut c = claims(NOW, 300);
    c.iss = "mallory".into();
    assert_eq!(
        verify(&k.sign(&c).expect("sign"), &s, &val(), NOW),
        Err(AuthError::WrongIssuer)
    );
}

#[test]
fn tampered_payload_and_signature() {
    let (k, s) = setup();
    let t = k.sign(&claims(NOW, 300)).expect("sign");
    let p = parts(&t);
    let mut c = claims(NOW, 300);
    c.space = "someone-elses".into();
    let forged = format!(
        "{}.{}.{}",
        p[0],
        b64(&serde_json::to_vec(&c).expect("json")),
        p[2]
    );
    assert_eq!(
        verify(&forged, &s, &val(), NOW),
        Err(AuthError::BadSignature)
    );
    let mut sig = URL_SAFE_NO_PAD.decode(&p[2]).expect("sig");
    sig[0] ^= 1;
    let forged = format!("{}.{}.{}", p[0], p[1], b64(&sig));
    assert_eq!(
        verify(&forged, &s, &val(), NOW),
        Err(AuthError::BadSignature)
    );
}

#[test]
fn alg_none_refused() {
    let (k, s) = setup();
    let p = parts(&k.sign(&claims(NOW, 300)).expect("sign"));
    for header in [
        format!(r#"{{"alg":"none","kid":"{}"}}"#, k.kid()),
        r#"{"alg":"none"}"#.to_string(),
        r#"{"alg":"NONE","typ":"JWT"}"#.to_string(),
    ] {
        let t = format!("{}.{}.", b64(header.as_bytes()), p[1]);
        assert!(
            matches!(verify(&t, &s, &val(), NOW), Err(AuthError::Algorithm(_))),
            "{header}"
        );
    }
}

#[test]
fn hs256_with_public_key_as_secret_refused() {
    let (k, s) = setup();
    let c = claims(NOW, 300);
    let pk = k.public_key();
    let raw = URL_SAFE_NO_PAD.decode(&pk.x).expect("x");
    for secret in [raw.clone(), pk.x.as_bytes().to_vec()] {
        let mut h = Header::new(Algorithm::HS256);
        h.kid = Some(k.kid().to_string());
        let t = jsonwebtoken::encode(&h, &c, &EncodingKey::from_secret(&secret)).expect("hs256");
        assert_eq!(
            verify(&t, &s, &val(), NOW),
            Err(AuthError::Algorithm("HS256".into()))
        );
    }
}

#[test]
fn unknown_or_missing_kid() {
    let (k, _) = setup();
    let (_, other) = setup();
    let t = k.sign(&claims(NOW, 300)).expect("sign");
    assert!(matches!(
        verify(&t, &other, &val(), NOW),
        Err(AuthError::UnknownKey(_))
    ));
    let p = parts(&t);
    let nokid = format!(
        "{}.{}.{}",
        b64(br#"{"alg":"EdDSA","typ":"JWT"}"#),
        p[1],
        p[2]
    );
    assert_eq!(
        verify(&nokid, &other, &val(), NOW),
        Err(AuthError::MissingClaim("kid"))
    );
}

#[test]
fn garbage_and_empty() {
    let (_, s) = setup();
    for g in ["", "   ", "garbage", "a.b.c", "....", "eyJ.eyJ.sig"] {
        assert!(
            matches!(verify(g, &s, &val(), NOW), Err(AuthError::Malformed(_))),
            "{g:?}"
        );
    }
}

#[test]
fn rotation_old_key_valid_until_not_after() {
    let (old, mut s) = setup();
    let new = SigningKey::generate().expect("key");
    s.insert(new.public_key()).expect("insert");
    let mut retired = old.public_key();
    retired.not_after = NOW + 600;
    s.insert(retired).expect("retire");
    let old_t = old.sign(&claims(NOW, 3600)).expect("sign");
    let new_t = new.sign(&claims(NOW, 3600)).expect("sign");
    assert!(
        verify(&old_t, &s, &val(), NOW + 500).is_ok(),
        "old key still valid before not_after"
    );
    assert!(matches!(
        verify(&old_t, &s, &val(), NOW + 700),
        Err(AuthError::KeyRetired(_))
    ));
    assert!(verify(&new_t, &s, &val(), NOW + 700).is_ok());
}

#[test]
fn scopes() {
    assert_eq!("shell:exec".parse::<Scope>(), Ok(Scope::ShellExec));
    assert_eq!(
        "root".parse::<Scope>(),
        Err(AuthError::UnknownScope("root".into()))
    );
    for s in Scope::ALL {
        assert_eq!(s.as_str().parse::<Scope>().as_ref(), Ok(s));
    }
    let set = ScopeSet::parse(&["shell:exec", "model:call"]).expect("parse");
    assert!(set.allows(Scope::ShellExec) && !set.allows(Scope::AgentsAdmin));
    let op = ScopeSet::parse(&["operator"]).expect("op");
    assert!(op.is_operator() && op.allows(Scope::AgentsAdmin) && op.contains_all(&set));
    assert!(!set.contains_all(&op));
    assert_eq!(
        serde_json::to_string(&set).expect("json"),
        r#"["shell:exec","model:call"]"#
    );
    assert!(ScopeSet::parse(&["shell:exec", "bogus"]).is_err());
}

#[test]
fn unknown_scope_in_token_refused() {
    let (k, s) = setup();
    let t = k.sign(&claims(NOW, 300)).expect("sign");
    let p = parts(&t);
    // Even with a valid signature, a token whose scopes we do not know is refused: sign one.
    let mut v: serde_json::Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(&p[1]).expect("b64")).expect("json");
    v["scopes"] = serde_json::json!(["root"]);
    let mut h = Header::new(Algorithm::EdDSA);
    h.kid = Some(k.kid().to_string());
    let t = jsonwebtoken::encode(&h, &v, &k.encoding).expect("sign");
    assert_eq!(
        verify(&t, &s, &val(), NOW),
        Err(AuthError::UnknownScope("root".into()))
    );
}

#[test]
fn pem_round_trip_and_debug_hides_secret() {
    let k = SigningKey::generate().expect("key");
    let pem = k.to_pem();
    let k2 = SigningKey::from_pem(&pem).expect("parse");
    assert_eq!(k.kid(), k2.kid());
    assert_eq!(k.public_key(), k2.public_key());
    let dbg = format!("{k:?}");
    assert!(dbg.contains(k.kid()));
    let body = pem.lines().nth(1).expect("line");
    assert!(!dbg.contains(body));
    assert!(SigningKey::from_pem("not a pem").is_err());
    let t = k2.sign(&claims(NOW, 60)).expect("sign");
    let mut s = KeySet::default();
    s.insert(k.public_key()).expect("insert");
    assert!(verify(&t, &s, &val(), NOW).is_ok());
}

#[test]
fn errors_do_not_echo_tokens() {
    let (_, s) = setup();
    let secretish = "eyJhbGciOiJIUzI1NiJ9.c2VjcmV0LXBheWxvYWQ.c2lnbmF0dXJl";
    let e = verify(secretish, &s, &val(), NOW).expect_err("refused");
    assert!(!e.to_string().contains("c2VjcmV0"), "{e}");
}
