//! A statement and its parameters in one call. The parameters are a tuple bound in order
//! (as rusqlite's `params!`), so each query in the repositories is one expression, not a
//! builder chain of `.bind` lines that looks like every other query's.
//!
//! The executor is anything sqlx runs statements on: the pool, or `&mut *tx` inside a
//! transaction.

use super::{Result, StorageError};
use sqlx::sqlite::{SqliteArguments, SqliteQueryResult, SqliteRow};
use sqlx::{Arguments, Encode, FromRow, Sqlite, SqliteExecutor, Type};

/// Values bound to a statement's `?` placeholders, in order: `()`, `(a,)`, `(a, b)`, ...
pub(crate) trait Params<'q> {
    fn into_arguments(self) -> Result<SqliteArguments<'q>>;
}

macro_rules! params_for_tuple {
    ($($value:ident),*) => {
        impl<'q, $($value),*> Params<'q> for ($($value,)*)
        where
            $($value: 'q + Send + Encode<'q, Sqlite> + Type<Sqlite>),*
        {
            #[allow(non_snake_case)]
            fn into_arguments(self) -> Result<SqliteArguments<'q>> {
                #[allow(unused_mut)]
                let mut arguments = SqliteArguments::default();
                let ($($value,)*) = self;
                $(arguments.add($value).map_err(sqlx::Error::Encode)?;)*
                Ok(arguments)
            }
        }
    };
}

params_for_tuple!();
params_for_tuple!(A);
params_for_tuple!(A, B);
params_for_tuple!(A, B, C);
params_for_tuple!(A, B, C, D);
params_for_tuple!(A, B, C, D, E);
params_for_tuple!(A, B, C, D, E, F);
params_for_tuple!(A, B, C, D, E, F, G);
params_for_tuple!(A, B, C, D, E, F, G, H);
params_for_tuple!(A, B, C, D, E, F, G, H, I);
params_for_tuple!(A, B, C, D, E, F, G, H, I, J);
params_for_tuple!(A, B, C, D, E, F, G, H, I, J, K);
params_for_tuple!(A, B, C, D, E, F, G, H, I, J, K, L);
params_for_tuple!(A, B, C, D, E, F, G, H, I, J, K, L, M);
params_for_tuple!(A, B, C, D, E, F, G, H, I, J, K, L, M, N);
params_for_tuple!(A, B, C, D, E, F, G, H, I, J, K, L, M, N, O);
params_for_tuple!(A, B, C, D, E, F, G, H, I, J, K, L, M, N, O, P);

/// Rows read as `T` (a `FromRow` struct or a tuple).
pub(crate) trait Row: for<'r> FromRow<'r, SqliteRow> + Send + Unpin {}
impl<T: for<'r> FromRow<'r, SqliteRow> + Send + Unpin> Row for T {}

/// Run a statement that returns no rows.
pub(crate) async fn execute<'e, 'q>(
    on: impl SqliteExecutor<'e>,
    sql: &'q str,
    params: impl Params<'q>,
) -> Result<SqliteQueryResult> {
    Ok(sqlx::query_with(sql, params.into_arguments()?)
        .execute(on)
        .await?)
}

/// The ways of reading rows, alike but for the sqlx query (rows as `T`, or their first
/// column as `T`), its fetch method and what it returns.
macro_rules! fetch {
    ($(#[$doc:meta] $name:ident -> $out:ty = $query:ident.$method:ident where [$($bound:tt)*];)*) => {$(
        #[$doc]
        pub(crate) async fn $name<'e, 'q, T>(
            on: impl SqliteExecutor<'e>,
            sql: &'q str,
            params: impl Params<'q>,
        ) -> Result<$out>
        where
            $($bound)*
        {
            Ok(sqlx::$query(sql, params.into_arguments()?)
                .$method(on)
                .await?)
        }
    )*};
}

fetch! {
    /// The one row a query returns (none is an error).
    one -> T = query_as_with.fetch_one where [T: Row];
    /// The first row a query returns, if any.
    optional -> Option<T> = query_as_with.fetch_optional where [T: Row];
    /// Every row a query returns.
    all -> Vec<T> = query_as_with.fetch_all where [T: Row];
    /// The first column of a query's first row, if any.
    value -> Option<T> = query_scalar_with.fetch_optional where [T: Send + Unpin, (T,): Row];
    /// The first column of every row a query returns.
    column -> Vec<T> = query_scalar_with.fetch_all where [T: Send + Unpin, (T,): Row];
}

/// `NotFound { what }` for a lookup that found no row or a statement that changed none.
pub(crate) trait Found: Sized {
    type Out;
    fn found(self, what: impl FnOnce() -> String) -> Result<Self::Out>;
}

impl<T> Found for Option<T> {
    type Out = T;
    fn found(self, what: impl FnOnce() -> String) -> Result<T> {
        self.ok_or_else(|| StorageError::NotFound { what: what() })
    }
}

impl Found for SqliteQueryResult {
    type Out = SqliteQueryResult;
    fn found(self, what: impl FnOnce() -> String) -> Result<Self> {
        if self.rows_affected() == 0 {
            return Err(StorageError::NotFound { what: what() });
        }
        Ok(self)
    }
}
