//! The console's admin account and its sessions (tokens stored only as hashes).

use super::{Db, Result, sql};

impl Db {
    /// The admin's row id and argon2 password hash.
    pub async fn admin_credentials(&self, username: &str) -> Result<Option<(i64, String)>> {
        sql::optional(
            self.pool(),
            "select id, password_hash from admin_credentials where username = ?",
            (username,),
        )
        .await
    }

    /// Store the admin's password hash (replacing an older one) and end every session of
    /// the old password.
    pub async fn set_admin_password(&self, username: &str, hash: &str) -> Result<()> {
        let mut tx = self.pool().begin_with("BEGIN IMMEDIATE").await?;
        sql::execute(
            &mut *tx,
            "insert into admin_credentials (username, password_hash) values (?, ?)
             on conflict (username) do update set password_hash = excluded.password_hash",
            (username, hash),
        )
        .await?;
        sql::execute(&mut *tx, "delete from web_sessions", ()).await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn insert_web_session(
        &self,
        token_hash: &str,
        admin_id: i64,
        csrf: &str,
        expires_at: &str,
    ) -> Result<()> {
        sql::execute(
            self.pool(),
            "insert into web_sessions (token_hash, admin_id, csrf_token, expires_at) values (?, ?, ?, ?)",
            (token_hash, admin_id, csrf, expires_at),
        )
        .await?;
        Ok(())
    }

    pub async fn delete_web_session(&self, token_hash: &str) -> Result<()> {
        sql::execute(
            self.pool(),
            "delete from web_sessions where token_hash = ?",
            (token_hash,),
        )
        .await?;
        Ok(())
    }

    /// The session with this token hash that has not expired by `now`: (admin id, CSRF
    /// token).
    pub async fn web_session(&self, token_hash: &str, now: &str) -> Result<Option<(i64, String)>> {
        sql::optional(
            self.pool(),
            "select admin_id, csrf_token from web_sessions where token_hash = ? and expires_at > ?",
            (token_hash, now),
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlx::SqlitePool;

    #[sqlx::test(migrations = "../migrations")]
    async fn a_new_password_ends_the_sessions_of_the_old_one(pool: SqlitePool) {
        let db = Db::from_pool(pool);
        assert_eq!(db.admin_credentials("admin").await.unwrap(), None);
        db.set_admin_password("admin", "hash-1").await.unwrap();
        let (id, hash) = db.admin_credentials("admin").await.unwrap().unwrap();
        assert_eq!(hash, "hash-1");
        db.insert_web_session("t1", id, "c1", "2999-01-01T00:00:00.000Z")
            .await
            .unwrap();
        db.insert_web_session("t0", id, "c0", "2000-01-01T00:00:00.000Z")
            .await
            .unwrap();
        let now = "2026-01-01T00:00:00.000Z";
        assert_eq!(
            db.web_session("t1", now).await.unwrap(),
            Some((id, "c1".to_string()))
        );
        assert_eq!(db.web_session("t0", now).await.unwrap(), None, "expired");
        db.set_admin_password("admin", "hash-2").await.unwrap();
        assert_eq!(
            db.admin_credentials("admin").await.unwrap().unwrap().1,
            "hash-2"
        );
        assert_eq!(db.web_session("t1", now).await.unwrap(), None);
        db.insert_web_session("t2", id, "c2", "2999-01-01T00:00:00.000Z")
            .await
            .unwrap();
        db.delete_web_session("t2").await.unwrap();
        assert_eq!(db.web_session("t2", now).await.unwrap(), None);
    }
}
