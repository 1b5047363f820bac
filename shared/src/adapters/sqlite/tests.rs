//! Tests of the writer's group commits and of what reads see.

use super::*;
use crate::domain::{Account, AccountId};
use crate::ports::{AdminStore, KeyStore};

type Answer<T> = oneshot::Receiver<Result<T, StoreError>>;

fn request<T, F>(f: F) -> (Box<dyn PendingWrite>, Answer<T>)
where
    T: Send + 'static,
    F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
{
    let (reply, answer) = oneshot::channel();
    (Box::new(Request { write: Some(f), result: None, reply }), answer)
}

/// A connection with a deferred foreign key: a violation of it fails the `COMMIT`.
fn connection() -> Connection {
    let conn = Connection::open_in_memory().unwrap();
    conn.execute_batch(
        "PRAGMA foreign_keys = ON;
         CREATE TABLE parents (id INTEGER PRIMARY KEY);
         CREATE TABLE children (id INTEGER PRIMARY KEY, parent INTEGER REFERENCES parents(id) DEFERRABLE INITIALLY DEFERRED);",
    )
    .unwrap();
    conn
}

fn insert_parent(conn: &Connection, id: i64) -> Result<(), StoreError> {
    execute(conn, "INSERT INTO parents (id) VALUES (?1)", [id]).map(drop).map_err(db_error)
}

fn parents(conn: &Connection) -> Vec<i64> {
    let mut stmt = conn.prepare("SELECT id FROM parents ORDER BY id").unwrap();
    let ids = stmt.query_map([], |r| r.get(0)).unwrap().collect::<Result<_, _>>().unwrap();
    ids
}

#[test]
fn a_failing_write_is_rolled_back_alone_and_the_rest_of_its_group_commits() {
    let conn = connection();
    let (first, first_answer) = request(|conn| insert_parent(conn, 1));
    // Inserts 2, then fails on 1: its insert of 2 goes too.
    let (conflicting, conflicting_answer) = request(|conn| {
        insert_parent(conn, 2)?;
        insert_parent(conn, 1)
    });
    let (panicking, panicking_answer) = request(|conn| -> Result<(), StoreError> {
        insert_parent(conn, 3)?;
        panic!("a bug in a write")
    });
    let (last, last_answer) = request(|conn| insert_parent(conn, 4).map(|()| "done"));

    commit_group(&conn, vec![first, conflicting, panicking, last]);

    assert!(first_answer.blocking_recv().unwrap().is_ok());
    assert!(matches!(conflicting_answer.blocking_recv().unwrap(), Err(StoreError::Other(_))));
    assert!(panicking_answer.blocking_recv().unwrap().is_err());
    assert_eq!(last_answer.blocking_recv().unwrap().unwrap(), "done");
    assert_eq!(parents(&conn), [1, 4]);
    assert!(conn.is_autocommit(), "the group's transaction is over");
}

#[test]
fn a_failed_commit_fails_every_write_of_its_group_and_the_next_group_commits() {
    let conn = connection();
    let (parent, parent_answer) = request(|conn| insert_parent(conn, 1));
    let (orphan, orphan_answer) = request(|conn| {
        execute(conn, "INSERT INTO children (id, parent) VALUES (1, 99)", []).map(drop).map_err(db_error)
    });

    commit_group(&conn, vec![parent, orphan]);

    assert!(parent_answer.blocking_recv().unwrap().is_err(), "its commit failed: it must not be acknowledged");
    assert!(orphan_answer.blocking_recv().unwrap().is_err());
    assert_eq!(parents(&conn), Vec::<i64>::new());
    assert!(conn.is_autocommit());

    let (again, again_answer) = request(|conn| insert_parent(conn, 1));
    commit_group(&conn, vec![again]);
    assert!(again_answer.blocking_recv().unwrap().is_ok());
    assert_eq!(parents(&conn), [1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_are_acknowledged_once_durable_and_visible_to_every_later_read() {
    let dir = std::env::temp_dir().join(format!("cadenhq-sqlite-{}", uuid::Uuid::new_v4()));
    let store = SqliteStore::open(&dir).unwrap();
    let writers: Vec<_> = (0..64)
        .map(|n| {
            let store = store.clone();
            tokio::spawn(async move {
                let account =
                    Account { id: AccountId::new(), name: format!("account {n}"), default_campaign_id: None, created_at: OffsetDateTime::now_utc() };
                store.create_account(&account).await.unwrap();
                let read = store.get_account(account.id).await.unwrap();
                assert_eq!(read.map(|a| a.name), Some(account.name.clone()), "an acknowledged write is visible");
                assert!(store.create_account(&account).await.is_err(), "the same account twice fails alone");
                account.id
            })
        })
        .collect();
    let mut ids = Vec::new();
    for writer in writers {
        ids.push(writer.await.unwrap());
    }
    drop(store);

    let reopened = SqliteStore::open(&dir).unwrap();
    for id in ids {
        assert!(reopened.get_account(id).await.unwrap().is_some());
    }
    drop(reopened);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_of_another_connection_is_visible_to_the_next_read() {
    let dir = std::env::temp_dir().join(format!("cadenhq-sqlite-{}", uuid::Uuid::new_v4()));
    let store = SqliteStore::open(&dir).unwrap();
    let account = Account { id: AccountId::new(), name: "before".into(), default_campaign_id: None, created_at: OffsetDateTime::now_utc() };
    store.create_account(&account).await.unwrap();
    assert_eq!(store.get_account(account.id).await.unwrap().unwrap().name, "before");
    // As the CLI would, from another process: the store's writer is idle, its pin held.
    let other = Connection::open(dir.join(DB_FILE)).unwrap();
    let renamed = serde_json::to_string(&Account { name: "after".into(), ..account.clone() }).unwrap();
    other.execute("UPDATE accounts SET doc = ?2 WHERE id = ?1", params![account.id.to_string(), renamed]).unwrap();

    assert_eq!(store.get_account(account.id).await.unwrap().unwrap().name, "after");
    drop((other, store));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_key_revoked_by_another_process_is_refused_at_once() {
    let dir = std::env::temp_dir().join(format!("cadenhq-sqlite-{}", uuid::Uuid::new_v4()));
    let store = SqliteStore::open(&dir).unwrap();
    let clock = crate::domain::SystemClock;
    let account = crate::admin::create_account(&store, "Keys", &clock).await.unwrap();
    let (record, key) = crate::admin::create_key(&store, account.id, None, &clock).await.unwrap();
    let hash = key.hash();
    assert!(store.find_key(&hash).await.unwrap().unwrap().is_active());
    assert!(store.find_key(&hash).await.unwrap().unwrap().is_active(), "served from the cache");

    // The CLI, from another process, with a store of its own.
    let cli = SqliteStore::open(&dir).unwrap();
    assert!(cli.revoke_key(record.key_id, OffsetDateTime::now_utc()).await.unwrap());

    assert!(!store.find_key(&hash).await.unwrap().unwrap().is_active(), "the revocation applies at once");
    drop((cli, store));
    std::fs::remove_dir_all(&dir).unwrap();
}
