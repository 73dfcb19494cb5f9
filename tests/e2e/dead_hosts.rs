//! Dead MX hosts cost their own messages, never everyone's sessions: so many hosts and
//! addresses are tried per transaction, within `timeouts.route` whatever a server does, and
//! only so many connections wait for one server's greeting at once.

use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::support::dns::TestZone;
use crate::support::lab::Lab;
use crate::support::mta::{BODY, send_body};
use crate::support::mx::{Tarpit, loopback, server};
use crate::support::smtp_server::{Action, ServerBehaviour, SmtpServer, Step};

/// How long a test waits for what must come at once before it says it did not.
const GUARD: Duration = Duration::from_secs(60);

/// A domain with many MX hosts that all fail costs its own messages only: so many hosts and
/// addresses are tried per transaction, within `timeouts.route`, and the MTA hears what
/// was and why the rest was not.
#[tokio::test]
async fn a_domain_with_many_failing_mx_hosts_is_tried_within_the_transactions_budget() {
    const HOSTS: u8 = 20;
    let busy = || ServerBehaviour::plain().greeting("421 4.3.2 busy");
    let mut servers = vec![server(loopback(10), 0, busy()).await];
    let port = servers[0].addr().port();
    let mut zone = TestZone::new();
    for n in 0..HOSTS {
        let host = format!("mx{n}.hostile.test");
        zone = zone
            .mx("hostile.test", 10 + u16::from(n), &host)
            .a(&host, loopback(10 + n));
        if n > 0 {
            let ip = loopback(10 + n);
            servers.push(server(ip, port, busy()).await);
        }
    }
    let tried = |servers: &[SmtpServer]| servers.iter().map(SmtpServer::connections).sum::<usize>();
    let send = |lab: &Lab| send_body(lab.smtp, &["b@hostile.test"], BODY);

    // The defaults: five MX hosts.
    let lab = Lab::new().zone(zone.clone()).mx_port(port).start().await;
    let (_, rcpts, _) = send(&lab).await;
    assert_eq!(
        (rcpts[0].code, rcpts[0].enhanced().as_deref()),
        (451, Some("4.4.1")),
        "{rcpts:?}"
    );
    assert!(
        rcpts[0].text().contains("15 more MX hosts not tried"),
        "{rcpts:?}"
    );
    assert_eq!(tried(&servers), 5);

    // Three addresses in all.
    let lab = Lab::new()
        .zone(zone.clone())
        .mx_port(port)
        .set("delivery.max_mx_hosts", 20)
        .set("delivery.max_addresses", 3)
        .start()
        .await;
    let (_, rcpts, _) = send(&lab).await;
    assert_eq!(rcpts[0].code, 451, "{rcpts:?}");
    assert_eq!(tried(&servers), 5 + 3);

    // No time left: no server at all.
    let lab = Lab::new()
        .zone(zone)
        .mx_port(port)
        .set("timeouts.route", "0s")
        .start()
        .await;
    let (_, rcpts, _) = send(&lab).await;
    assert_eq!(rcpts[0].code, 451, "{rcpts:?}");
    assert_eq!(tried(&servers), 5 + 3, "nothing more tried");
}

/// A server that accepts and never greets keeps the search no longer than
/// `timeouts.route`: the MTA hears 451 4.4.1 naming it, and nothing is cached, so the next
/// message tries it again.
#[tokio::test]
async fn a_server_that_never_greets_keeps_the_search_no_longer_than_its_time() {
    let tarpit = Tarpit::start(loopback(1), 0).await;
    let zone = TestZone::new()
        .mx("example.test", 10, "mx.example.test")
        .a("mx.example.test", loopback(1));
    let lab = Lab::new()
        .zone(zone)
        .mx_port(tarpit.addr().port())
        .set("timeouts.route", "1s")
        .start()
        .await;
    for tries in 1..=2 {
        let sent = tokio::time::timeout(GUARD, send_body(lab.smtp, &["b@example.test"], BODY));
        let (_, rcpts, _) = sent
            .await
            .expect("the search ends with timeouts.route, not the 5 minutes of the greeting");
        assert_eq!(
            (rcpts[0].code, rcpts[0].enhanced().as_deref()),
            (451, Some("4.4.1")),
            "{rcpts:?}"
        );
        let text = rcpts[0].text();
        assert!(
            text.contains("mx.example.test[127.0.0.1]: abandoned"),
            "{text}"
        );
        assert!(text.contains("(timeouts.route)"), "{text}");
        assert_eq!(tarpit.accepted(), tries, "tried again: nothing was cached");
    }
}

/// A hostile domain of 50 MX hosts that accept and never greet, under `max_sessions: 20`:
/// at most two connections wait late for each of the five hosts tried, so ten sessions wait
/// and the other hostile messages are answered at once; mail to a good domain goes through.
#[tokio::test]
async fn a_domain_of_silent_hosts_holds_no_more_sessions_than_its_hosts_let_wait() {
    const HOSTS: u8 = 50;
    let good = server(loopback(200), 0, ServerBehaviour::plain()).await;
    let port = good.addr().port();
    let mut zone = TestZone::new()
        .mx("good.test", 10, "mx.good.test")
        .a("mx.good.test", loopback(200));
    let mut tarpits = Vec::new();
    for n in 0..HOSTS {
        let host = format!("mx{n}.hostile.test");
        zone = zone
            .mx("hostile.test", 10 + u16::from(n), &host)
            .a(&host, loopback(10 + n));
        tarpits.push(Tarpit::start(loopback(10 + n), port).await);
    }
    let lab = Lab::new()
        .zone(zone)
        .mx_port(port)
        .set("limits.max_sessions", 20)
        .set("delivery.max_waiting_per_server", 2)
        // Every wait counts as late at once: no test waits for a greeting to be slow.
        .set("delivery.slow_greeting", "0s")
        .start()
        .await;

    let (replies, mut answered) = mpsc::unbounded_channel();
    let mut senders = JoinSet::new();
    for _ in 0..19 {
        let (replies, smtp) = (replies.clone(), lab.smtp);
        senders.spawn(async move {
            let (_, rcpts, _) = send_body(smtp, &["b@hostile.test"], BODY).await;
            let _ = replies.send(rcpts[0].clone());
        });
    }
    for _ in 0..9 {
        let reply = tokio::time::timeout(GUARD, answered.recv())
            .await
            .expect("the hostile messages beyond the waiting ones are answered at once")
            .expect("a sender");
        assert_eq!(
            (reply.code, reply.enhanced().as_deref()),
            (451, Some("4.4.1")),
            "{reply:?}"
        );
        assert!(
            reply
                .text()
                .contains("2 connections already wait for its greeting"),
            "{reply:?}"
        );
    }
    for tarpit in &tarpits[..5] {
        tarpit.wait_accepted(2).await;
    }

    let (_, rcpts, data) = send_body(lab.smtp, &["b@good.test"], BODY).await;
    assert_eq!((rcpts[0].code, data.code), (250, 250), "{rcpts:?} {data:?}");
    assert_eq!(good.messages().len(), 1);
    let waiting: Vec<usize> = tarpits.iter().map(Tarpit::accepted).collect();
    assert_eq!(
        waiting[..5],
        [2; 5],
        "two connections wait at each host tried"
    );
    assert_eq!(
        waiting.iter().sum::<usize>(),
        10,
        "no host past the fifth: {waiting:?}"
    );
    assert!(
        answered.try_recv().is_err(),
        "the ten waiting have no answer yet"
    );
}

/// A burst of new connections to a server that greets in time is never refused: twenty
/// sessions wait for one server's greeting at once, above `max_waiting_per_server` (10),
/// and every message is delivered once it greets. Only waits longer than
/// `delivery.slow_greeting` count.
#[tokio::test]
async fn a_burst_to_a_server_that_greets_in_time_is_never_refused() {
    const SESSIONS: usize = 20;
    let mx = server(
        loopback(1),
        0,
        ServerBehaviour::plain().on(Step::Greeting, Action::Hold),
    )
    .await;
    let zone = TestZone::new()
        .mx("example.test", 10, "mx.example.test")
        .a("mx.example.test", loopback(1));
    let lab = Lab::new()
        .zone(zone)
        .mx_port(mx.addr().port())
        .start()
        .await;
    let mut senders = JoinSet::new();
    for _ in 0..SESSIONS {
        let smtp = lab.smtp;
        senders.spawn(async move { send_body(smtp, &["b@example.test"], BODY).await });
    }
    mx.wait_until("every session waits for the greeting", |c| {
        c.len() == SESSIONS
    })
    .await;
    mx.release();
    while let Some(sent) = senders.join_next().await {
        let (_, rcpts, data) = sent.expect("a sender");
        assert_eq!((rcpts[0].code, data.code), (250, 250), "{rcpts:?} {data:?}");
    }
    assert_eq!(mx.messages().len(), SESSIONS);
}
